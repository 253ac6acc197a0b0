//! End-to-end tests of the identity layer against a real IdP on 127.0.0.1.

pub(crate) mod support;

use std::{sync::Arc, time::Duration};

use serde_json::{Value, json};

use self::support::{TestIdp, TestKey, b64, claims, eventually, hs256_token, now_secs};
use super::{Algorithm, ClaimSource, FetchError, IssuerSettings, Verifier, VerifyError};

fn settings(idp: &TestIdp) -> IssuerSettings {
    IssuerSettings::new(&idp.issuer, ["idgate"])
}

/// A verifier whose keys have been fetched once.
async fn ready(settings: impl IntoIterator<Item = IssuerSettings>) -> Verifier {
    let verifier = Verifier::new(settings).unwrap();
    for (issuer, result) in verifier.refresh_all().await {
        result.unwrap_or_else(|e| panic!("{issuer}: {e}"));
    }
    verifier
}

async fn refused(verifier: &Verifier, token: &str) -> VerifyError {
    match verifier.verify(token).await {
        Ok(t) => panic!("token accepted: {t:?}"),
        Err(e) => e,
    }
}

fn with(mut claims: Value, changes: Value) -> Value {
    let o = claims.as_object_mut().unwrap();
    for (k, v) in changes.as_object().unwrap() {
        if v.is_null() {
            o.remove(k);
        } else {
            o.insert(k.clone(), v.clone());
        }
    }
    claims
}

#[tokio::test]
async fn valid_tokens_of_each_algorithm_verify() {
    let (rsa, ec, ed) = (
        TestKey::rsa("rsa"),
        TestKey::es256("ec"),
        TestKey::ed25519("ed"),
    );
    let idp = TestIdp::start(&[&rsa, &ec, &ed]).await;
    let verifier = ready([settings(&idp)]).await;
    let c = claims(&idp.issuer);
    for key in [&rsa, &ec, &ed] {
        let token = verifier
            .verify(&key.token(&c))
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", key.alg()));
        assert_eq!(&*token.issuer, idp.issuer);
        assert_eq!(token.subject, "user-1");
        assert_eq!(token.user, "user-1");
        assert_eq!(
            token
                .expires_at
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
            c["exp"].as_u64().unwrap()
        );
        assert_eq!(token.claims["client_id"], "cli");
    }
    assert_eq!(idp.discovery_hits(), 1);
    assert_eq!(idp.jwks_hits(), 1, "verifying known keys must not fetch");
}

#[tokio::test]
async fn ps256_only_when_allowed() {
    let rsa = TestKey::rsa("rsa");
    let idp = TestIdp::start(&[&rsa]).await;
    let token = rsa.token_with_header(&json!({"alg": "PS256", "kid": "rsa"}), &claims(&idp.issuer));

    let default = ready([settings(&idp)]).await;
    assert_eq!(refused(&default, &token).await, VerifyError::AlgNotAllowed);

    let mut s = settings(&idp);
    s.algorithms.push(Algorithm::PS256);
    let with_ps256 = ready([s]).await;
    with_ps256.verify(&token).await.unwrap();
}

#[tokio::test]
async fn alg_none_is_refused() {
    let rsa = TestKey::rsa("rsa");
    let idp = TestIdp::start(&[&rsa]).await;
    let verifier = ready([settings(&idp)]).await;
    let c = claims(&idp.issuer);
    let unsigned = format!(
        "{}.{}.",
        b64(json!({"alg": "none"}).to_string()),
        b64(c.to_string())
    );
    assert_eq!(
        refused(&verifier, &unsigned).await,
        VerifyError::AlgNotAllowed
    );
    // `none` with a real signature glued on, and the case variants some libraries accepted.
    let signed = rsa.token(&c);
    let signature = signed.rsplit_once('.').unwrap().1;
    for alg in ["none", "None", "NONE", "nOnE"] {
        let header = b64(json!({"alg": alg, "kid": "rsa"}).to_string());
        let forged = format!("{header}.{}.{signature}", b64(c.to_string()));
        assert_eq!(
            refused(&verifier, &forged).await,
            VerifyError::AlgNotAllowed,
            "{alg}"
        );
    }
}

#[tokio::test]
async fn hs256_signed_with_the_rsa_public_key_is_refused() {
    let rsa = TestKey::rsa("rsa");
    let idp = TestIdp::start(&[&rsa]).await;
    let verifier = ready([settings(&idp)]).await;
    let c = claims(&idp.issuer);
    let der = rsa.rsa_public_der();
    let pem = format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &der)
    );
    let jwk = rsa.jwk().to_string();
    for secret in [der.as_slice(), pem.as_bytes(), jwk.as_bytes()] {
        for alg in ["HS256", "HS384", "HS512"] {
            let forged = hs256_token(&json!({"alg": alg, "kid": "rsa"}), &c, secret);
            assert_eq!(
                refused(&verifier, &forged).await,
                VerifyError::AlgNotAllowed,
                "{alg}"
            );
        }
    }
    // Nor can an operator open the door by configuration.
    let mut s = settings(&idp);
    s.algorithms.push(Algorithm::HS256);
    assert!(
        Verifier::new([s])
            .unwrap_err()
            .to_string()
            .contains("HS256")
    );
}

#[tokio::test]
async fn unknown_kid_refetches_once_then_is_refused() {
    let rsa = TestKey::rsa("rsa");
    let idp = TestIdp::start(&[&rsa]).await;
    let verifier = ready([settings(&idp)]).await;
    assert_eq!(idp.jwks_hits(), 1);
    let stranger = TestKey::rsa("stranger");
    let token = stranger.token(&claims(&idp.issuer));
    assert_eq!(refused(&verifier, &token).await, VerifyError::UnknownKid);
    assert_eq!(
        idp.jwks_hits(),
        2,
        "exactly one refetch for the unknown kid"
    );
    let stats = &verifier.stats()[0];
    assert_eq!((stats.unknown_kid_refetches, stats.refreshes_ok), (1, 2));
}

#[tokio::test]
async fn a_flood_of_unknown_kids_fetches_the_key_set_at_most_once() {
    let rsa = TestKey::rsa("rsa");
    let idp = TestIdp::start(&[&rsa]).await;
    let mut s = settings(&idp);
    s.jwks_min_refetch_interval = Duration::from_secs(3600);
    let verifier = Arc::new(ready([s]).await);
    let forged: Vec<String> = (0..100)
        .map(|i| {
            let header = json!({"alg": "RS256", "kid": format!("made-up-{i}")});
            rsa.token_with_header(&header, &claims(&idp.issuer))
        })
        .collect();

    let mut tasks = tokio::task::JoinSet::new();
    for token in &forged {
        let (verifier, token) = (verifier.clone(), token.clone());
        tasks.spawn(async move { verifier.verify(&token).await });
    }
    while let Some(result) = tasks.join_next().await {
        assert_eq!(result.unwrap().unwrap_err(), VerifyError::UnknownKid);
    }
    for token in &forged {
        assert_eq!(refused(&verifier, token).await, VerifyError::UnknownKid);
    }
    assert_eq!(
        idp.jwks_hits(),
        2,
        "initial fetch plus a single refetch for 200 unknown kids"
    );
    let stats = &verifier.stats()[0];
    assert_eq!(stats.unknown_kid_refetches, 1);
    assert!(stats.refetches_suppressed >= 100, "{stats:?}");
    // The real key still works during the flood's aftermath.
    verifier
        .verify(&rsa.token(&claims(&idp.issuer)))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_token_naming_another_keys_kid_fails_the_signature() {
    let (a, b) = (TestKey::rsa("a"), TestKey::rsa("b"));
    let ec = TestKey::es256("ec");
    let idp = TestIdp::start(&[&a, &b, &ec]).await;
    let verifier = ready([settings(&idp)]).await;
    let c = claims(&idp.issuer);
    let swapped = a.token_with_header(&json!({"alg": "RS256", "kid": "b"}), &c);
    assert_eq!(
        refused(&verifier, &swapped).await,
        VerifyError::BadSignature
    );
    // An EC signature naming an RSA key: the key cannot serve ES256 at all.
    let cross = ec.token_with_header(&json!({"alg": "ES256", "kid": "a"}), &c);
    assert_eq!(refused(&verifier, &cross).await, VerifyError::KeyMismatch);
    assert_eq!(idp.jwks_hits(), 1);
}

#[tokio::test]
async fn kid_is_required_only_when_the_set_has_several_keys() {
    let (a, b) = (TestKey::rsa("a"), TestKey::rsa("b"));
    let idp = TestIdp::start(&[&a]).await;
    let verifier = ready([settings(&idp)]).await;
    let c = claims(&idp.issuer);
    let no_kid = a.token_with_header(&json!({"alg": "RS256"}), &c);
    verifier.verify(&no_kid).await.unwrap();

    idp.set_keys(&[&a, &b]);
    verifier.refresh_all().await[0].1.as_ref().unwrap();
    assert_eq!(refused(&verifier, &no_kid).await, VerifyError::MissingKid);
}

#[tokio::test]
async fn jwk_alg_and_use_must_fit_the_token() {
    let (a, b, c) = (
        TestKey::rsa("rs384-only"),
        TestKey::rsa("enc"),
        TestKey::rsa("sig"),
    );
    let idp = TestIdp::start(&[]).await;
    idp.set_jwks(json!({"keys": [
        a.jwk_with(json!({"alg": "RS384"})),
        b.jwk_with(json!({"use": "enc"})),
        c.jwk_with(json!({"alg": "RS256", "use": "sig"})),
    ]}));
    let verifier = ready([settings(&idp)]).await;
    let claims = claims(&idp.issuer);
    assert_eq!(
        refused(&verifier, &a.token(&claims)).await,
        VerifyError::KeyMismatch
    );
    assert_eq!(
        refused(&verifier, &b.token(&claims)).await,
        VerifyError::KeyMismatch
    );
    verifier.verify(&c.token(&claims)).await.unwrap();
}

#[tokio::test]
async fn time_claims_are_honoured_with_leeway() {
    let key = TestKey::es256("ec");
    let idp = TestIdp::start(&[&key]).await;
    let verifier = ready([settings(&idp)]).await; // leeway 60 s
    let now = now_secs();
    let c = claims(&idp.issuer);
    let cases = [
        (json!({"exp": now - 120}), Err(VerifyError::Expired)),
        (json!({"exp": now - 30}), Ok(())),
        (json!({"nbf": now + 300}), Err(VerifyError::NotYetValid)),
        (json!({"nbf": now + 30}), Ok(())),
        (json!({"iat": now + 300}), Err(VerifyError::IssuedInFuture)),
        (json!({"iat": now + 30}), Ok(())),
        (json!({"exp": null}), Err(VerifyError::MissingExp)),
        (
            json!({"exp": "tomorrow"}),
            Err(VerifyError::Malformed("exp is not a number")),
        ),
        (json!({"exp": (now + 300) as f64 + 0.5}), Ok(())),
        (json!({"nbf": null, "iat": null}), Ok(())),
    ];
    for (changes, expected) in cases {
        let token = key.token(&with(c.clone(), changes.clone()));
        assert_eq!(
            verifier.verify(&token).await.map(|_| ()),
            expected,
            "{changes}"
        );
    }
}

#[tokio::test]
async fn issuer_and_audience_must_match() {
    let key = TestKey::ed25519("ed");
    let idp = TestIdp::start(&[&key]).await;
    let mut s = settings(&idp);
    s.audiences = vec!["idgate".into(), "ssh-gw".into()];
    let verifier = ready([s]).await;
    let c = claims(&idp.issuer);
    let cases = [
        (
            json!({"iss": "https://evil.example/realms/test"}),
            Err(VerifyError::UnknownIssuer),
        ),
        (
            json!({"iss": format!("{}/", idp.issuer)}),
            Err(VerifyError::UnknownIssuer),
        ),
        (json!({"iss": null}), Err(VerifyError::UnknownIssuer)),
        (json!({"aud": "other"}), Err(VerifyError::WrongAudience)),
        (
            json!({"aud": ["other", "IDGATE"]}),
            Err(VerifyError::WrongAudience),
        ),
        (json!({"aud": null}), Err(VerifyError::WrongAudience)),
        (json!({"aud": ["other", "ssh-gw"]}), Ok(())),
        (json!({"sub": null}), Err(VerifyError::MissingClaim)),
        (json!({"sub": ""}), Err(VerifyError::MissingClaim)),
    ];
    for (changes, expected) in cases {
        let token = key.token(&with(c.clone(), changes.clone()));
        assert_eq!(
            verifier.verify(&token).await.map(|_| ()),
            expected,
            "{changes}"
        );
    }
}

#[tokio::test]
async fn the_issuer_check_holds_even_past_routing() {
    // The verifier routes by `iss`, so a mismatch cannot reach an issuer through it; the
    // per-issuer check is defence in depth and is exercised directly.
    let key = TestKey::rsa("rsa");
    let idp = TestIdp::start(&[&key]).await;
    let verifier = ready([settings(&idp)]).await;
    let issuer = verifier.issuers.get(&idp.issuer).unwrap();
    let token = key.token(&with(
        claims(&idp.issuer),
        json!({"iss": "https://other.example"}),
    ));
    let parts = super::verify::split(&token).unwrap();
    let header_json = super::verify::decode_part(parts.header, "h").unwrap();
    let header = super::verify::parse_header(&header_json).unwrap();
    let claims = super::verify::parse_claims(parts.payload).unwrap();
    let result = issuer
        .verify(
            &parts,
            &header,
            Algorithm::RS256,
            claims,
            std::time::SystemTime::now(),
        )
        .await;
    assert_eq!(result.unwrap_err(), VerifyError::WrongIssuer);
}

#[tokio::test]
async fn tampering_and_bad_signatures_are_caught() {
    let key = TestKey::rsa("rsa");
    let idp = TestIdp::start(&[&key]).await;
    let verifier = ready([settings(&idp)]).await;
    let c = claims(&idp.issuer);
    let token = key.token(&c);
    let (header, rest) = token.split_once('.').unwrap();
    let (_, signature) = rest.split_once('.').unwrap();

    let elevated = b64(with(c.clone(), json!({"sub": "admin"})).to_string());
    let tampered = format!("{header}.{elevated}.{signature}");
    assert_eq!(
        refused(&verifier, &tampered).await,
        VerifyError::BadSignature
    );

    let mut sig =
        base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, signature)
            .unwrap();
    sig[10] ^= 1;
    let flipped = format!("{}.{}", token.rsplit_once('.').unwrap().0, b64(&sig));
    assert_eq!(
        refused(&verifier, &flipped).await,
        VerifyError::BadSignature
    );

    let truncated = format!("{}.{}", token.rsplit_once('.').unwrap().0, b64(&sig[..100]));
    assert_eq!(
        refused(&verifier, &truncated).await,
        VerifyError::BadSignature
    );

    let empty = format!("{}.", token.rsplit_once('.').unwrap().0);
    assert_eq!(refused(&verifier, &empty).await, VerifyError::BadSignature);

    let not_b64 = format!("{}.!!!", token.rsplit_once('.').unwrap().0);
    assert_eq!(refused(&verifier, &not_b64).await.reason(), "malformed");

    verifier.verify(&token).await.unwrap();
}

#[tokio::test]
async fn malformed_tokens_are_refused_before_any_key_lookup() {
    let key = TestKey::rsa("rsa");
    let idp = TestIdp::start(&[&key]).await;
    let verifier = ready([settings(&idp)]).await;
    let c = b64(claims(&idp.issuer).to_string());
    let h = b64(json!({"alg": "RS256", "kid": "rsa"}).to_string());
    let cases = [
        ("".to_owned(), "missing_token"),
        ("garbage".to_owned(), "malformed"),
        (format!("{h}.{c}"), "malformed"),
        (format!("{h}.{c}.sig.extra.part"), "malformed"),
        (format!("{h}=.{c}.sig"), "malformed"),
        (format!("{}.{c}.sig", b64("not json")), "malformed"),
        (format!("{h}.{}.sig", b64("[1,2]")), "malformed"),
        (
            format!(
                "{}.{c}.sig",
                b64(r#"{"alg":"RS256","crit":["b64"],"b64":false}"#)
            ),
            "unsupported_header",
        ),
        (
            format!("{}.{c}.sig", b64(r#"{"alg":"ES512"}"#)),
            "alg_not_allowed",
        ),
    ];
    for (token, reason) in cases {
        assert_eq!(refused(&verifier, &token).await.reason(), reason, "{token}");
    }
    assert_eq!(idp.jwks_hits(), 1);
}

#[tokio::test]
async fn oversize_tokens_are_refused_unparsed() {
    let key = TestKey::rsa("rsa");
    let idp = TestIdp::start(&[&key]).await;
    let verifier = ready([settings(&idp)]).await; // 8 KiB
    let big = with(
        claims(&idp.issuer),
        json!({"padding": "x".repeat(8 * 1024)}),
    );
    let err = refused(&verifier, &key.token(&big)).await;
    assert_eq!(err, VerifyError::TokenTooLarge { max: 8192 });
    // Not even a token: the size is judged before anything else.
    assert_eq!(
        refused(&verifier, &"!".repeat(9000)).await.reason(),
        "token_too_large"
    );
    let fits = with(
        claims(&idp.issuer),
        json!({"padding": "x".repeat(5 * 1024)}),
    );
    verifier.verify(&key.token(&fits)).await.unwrap();

    // A stricter issuer next to a lenient one keeps its own limit.
    let key2 = TestKey::rsa("rsa2");
    let idp2 = TestIdp::start(&[&key2]).await;
    let mut strict = settings(&idp2);
    strict.max_token_bytes = 2048;
    let both = ready([settings(&idp), strict]).await;
    let medium = with(claims(&idp2.issuer), json!({"padding": "x".repeat(3000)}));
    assert_eq!(
        refused(&both, &key2.token(&medium)).await,
        VerifyError::TokenTooLarge { max: 2048 }
    );
    both.verify(&key2.token(&claims(&idp2.issuer)))
        .await
        .unwrap();
}

#[tokio::test]
async fn typ_at_jwt_is_enforced_when_required() {
    let key = TestKey::es256("ec");
    let idp = TestIdp::start(&[&key]).await;
    let mut s = settings(&idp);
    s.require_typ_at_jwt = true;
    let strict = ready([s]).await;
    let lenient = ready([settings(&idp)]).await;
    let c = claims(&idp.issuer);
    let token = |typ: Option<&str>| {
        let mut h = json!({"alg": "ES256", "kid": "ec"});
        if let Some(typ) = typ {
            h["typ"] = typ.into();
        }
        key.token_with_header(&h, &c)
    };
    for ok in ["at+jwt", "application/AT+JWT"] {
        strict.verify(&token(Some(ok))).await.unwrap();
    }
    assert_eq!(
        refused(&strict, &token(Some("JWT"))).await,
        VerifyError::WrongTyp
    );
    assert_eq!(refused(&strict, &token(None)).await, VerifyError::WrongTyp);
    lenient.verify(&token(Some("JWT"))).await.unwrap();
    lenient.verify(&token(None)).await.unwrap();
}

#[tokio::test]
async fn rotated_keys_are_fetched_on_demand_and_old_ones_dropped() {
    let (old, new) = (TestKey::rsa("2024"), TestKey::es256("2025"));
    let idp = TestIdp::start(&[&old]).await;
    let verifier = ready([settings(&idp)]).await;
    let c = claims(&idp.issuer);
    verifier.verify(&old.token(&c)).await.unwrap();

    idp.set_keys(&[&new]);
    verifier.verify(&new.token(&c)).await.unwrap();
    assert_eq!(idp.jwks_hits(), 2, "the new kid was fetched once");
    assert_eq!(
        refused(&verifier, &old.token(&c)).await,
        VerifyError::UnknownKid
    );
    assert_eq!(
        idp.jwks_hits(),
        2,
        "a second refetch within the interval is suppressed"
    );
}

#[tokio::test]
async fn background_refresh_picks_up_rotation_and_drops_old_keys() {
    let (old, new) = (TestKey::ed25519("old"), TestKey::ed25519("new"));
    let idp = TestIdp::start(&[&old]).await;
    let mut s = settings(&idp);
    s.jwks_refresh_interval = Duration::from_millis(100);
    let verifier = ready([s]).await;
    let _refresh = verifier.spawn_refresh();
    let c = claims(&idp.issuer);
    verifier.verify(&old.token(&c)).await.unwrap();

    idp.set_keys(&[&new]);
    let hits = idp.jwks_hits();
    assert!(eventually(Duration::from_secs(10), || idp.jwks_hits() >= hits + 2).await);
    verifier.verify(&new.token(&c)).await.unwrap();
    let stats = &verifier.stats()[0];
    assert_eq!(
        stats.unknown_kid_refetches, 0,
        "the background task found the new key"
    );
    assert!(
        stats.refreshes_ok >= 3 && stats.last_refresh_ok.is_some(),
        "{stats:?}"
    );
    assert_eq!(
        refused(&verifier, &old.token(&c)).await,
        VerifyError::UnknownKid
    );
}

#[tokio::test]
async fn dropping_the_refresh_handle_stops_refreshing() {
    let key = TestKey::rsa("rsa");
    let idp = TestIdp::start(&[&key]).await;
    let mut s = settings(&idp);
    s.jwks_refresh_interval = Duration::from_millis(50);
    let verifier = ready([s]).await;
    let refresh = verifier.spawn_refresh();
    assert!(eventually(Duration::from_secs(10), || idp.jwks_hits() >= 3).await);
    drop(refresh);
    // One fetch may have been in flight when the task was aborted.
    tokio::task::yield_now().await;
    let settled = idp.jwks_hits();
    let later = verifier.stats()[0].refreshes_ok;
    assert!(
        !eventually(Duration::from_millis(500), || idp.jwks_hits() > settled + 1).await,
        "refresh continued after the handle was dropped"
    );
    assert!(verifier.stats()[0].refreshes_ok <= later + 1);
}

#[tokio::test]
async fn when_the_idp_goes_down_the_last_good_keys_keep_working() {
    let key = TestKey::rsa("rsa");
    let mut idp = TestIdp::start(&[&key]).await;
    let verifier = ready([settings(&idp)]).await;
    let c = claims(&idp.issuer);
    idp.stop().await;

    let results = verifier.refresh_all().await;
    assert!(
        matches!(results[0].1, Err(FetchError::Http { .. })),
        "{:?}",
        results[0].1
    );
    assert_eq!(verifier.stats()[0].refreshes_failed, 1);
    verifier.verify(&key.token(&c)).await.unwrap();

    // An unknown kid while down: one failed attempt, counted, and the answer is still unknown_kid.
    let stranger = TestKey::es256("stranger");
    assert_eq!(
        refused(&verifier, &stranger.token(&c)).await,
        VerifyError::UnknownKid
    );
    let stats = &verifier.stats()[0];
    assert_eq!(
        (stats.refreshes_ok, stats.refreshes_failed, stats.keys),
        (1, 2, 1)
    );
    verifier.verify(&key.token(&c)).await.unwrap();
}

#[tokio::test]
async fn an_idp_never_reached_makes_tokens_unverifiable_not_invalid() {
    let key = TestKey::rsa("rsa");
    let mut idp = TestIdp::start(&[&key]).await;
    idp.stop().await;
    let verifier = Verifier::new([settings(&idp)]).unwrap();
    assert!(verifier.refresh_all().await[0].1.is_err());
    let err = refused(&verifier, &key.token(&claims(&idp.issuer))).await;
    assert_eq!(err, VerifyError::IdpUnavailable);
    assert_eq!(err.http_status(), 503);
}

#[tokio::test]
async fn a_key_set_without_usable_keys_does_not_replace_the_old_one() {
    let key = TestKey::rsa("rsa");
    let idp = TestIdp::start(&[&key]).await;
    let verifier = ready([settings(&idp)]).await;
    idp.set_jwks(json!({"keys": [{"kty": "oct", "kid": "hmac", "k": b64("secret")}]}));
    let results = verifier.refresh_all().await;
    assert!(
        matches!(results[0].1, Err(FetchError::NoUsableKeys { .. })),
        "{:?}",
        results[0].1
    );
    idp.set_jwks(json!({"error": "oops"}));
    assert!(matches!(
        verifier.refresh_all().await[0].1,
        Err(FetchError::Json { .. })
    ));
    verifier
        .verify(&key.token(&claims(&idp.issuer)))
        .await
        .unwrap();
    assert_eq!(verifier.stats()[0].refreshes_failed, 2);
}

#[tokio::test]
async fn discovery_must_name_the_configured_issuer() {
    let key = TestKey::rsa("rsa");
    let idp = TestIdp::start(&[&key]).await;
    idp.set_discovery_issuer(&format!("{}/", idp.issuer));
    let verifier = Verifier::new([settings(&idp)]).unwrap();
    let results = verifier.refresh_all().await;
    assert!(
        matches!(results[0].1, Err(FetchError::IssuerMismatch { .. })),
        "{:?}",
        results[0].1
    );
    assert_eq!(
        idp.jwks_hits(),
        0,
        "keys are not fetched from an IdP that is not ours"
    );
    let err = refused(&verifier, &key.token(&claims(&idp.issuer))).await;
    assert_eq!(err, VerifyError::IdpUnavailable);
}

#[tokio::test]
async fn discovery_jwks_uri_must_be_a_safe_url() {
    let key = TestKey::rsa("rsa");
    let idp = TestIdp::start(&[&key]).await;
    idp.set_jwks_uri("ftp://127.0.0.1/certs");
    let verifier = Verifier::new([settings(&idp)]).unwrap();
    let results = verifier.refresh_all().await;
    assert!(
        matches!(results[0].1, Err(FetchError::UrlNotAllowed { .. })),
        "{:?}",
        results[0].1
    );
}

#[tokio::test]
async fn a_configured_jwks_uri_skips_discovery() {
    let key = TestKey::rsa("rsa");
    let idp = TestIdp::start(&[&key]).await;
    let mut s = settings(&idp);
    s.jwks_uri = Some(format!("{}/realms/test/certs", idp.base));
    let verifier = ready([s]).await;
    verifier
        .verify(&key.token(&claims(&idp.issuer)))
        .await
        .unwrap();
    assert_eq!((idp.discovery_hits(), idp.jwks_hits()), (0, 1));
}

#[tokio::test]
async fn groups_and_scopes_come_from_every_configured_claim() {
    let key = TestKey::rsa("rsa");
    let idp = TestIdp::start(&[&key]).await;
    let mut s = settings(&idp);
    s.user_claim = "preferred_username".into();
    s.group_claims = vec![
        ClaimSource::array("groups"),
        ClaimSource::array("realm_access.roles"),
        ClaimSource::array("https://idgate.example/teams"),
        ClaimSource::space_separated("scope"),
    ];
    let verifier = ready([s]).await;
    let c = with(
        claims(&idp.issuer),
        json!({
            "preferred_username": "alice",
            "groups": ["admins", "ops"],
            "realm_access": {"roles": ["ops", "dev", 42]},
            "https://idgate.example/teams": "blue",
            "scope": "openid ssh  admins",
            "scp": ["ssh", "db"],
        }),
    );
    let token = verifier.verify(&key.token(&c)).await.unwrap();
    assert_eq!(token.user, "alice");
    assert_eq!(token.subject, "user-1");
    assert_eq!(
        token.groups,
        ["admins", "ops", "dev", "blue", "openid", "ssh"]
    );
    assert_eq!(token.scopes, ["openid", "ssh", "admins", "db"]);

    let no_user = with(c, json!({"preferred_username": null}));
    assert_eq!(
        refused(&verifier, &key.token(&no_user)).await,
        VerifyError::MissingClaim
    );
}

#[tokio::test]
async fn each_token_is_verified_with_its_own_issuers_keys() {
    let (ka, kb) = (TestKey::rsa("a"), TestKey::es256("b"));
    let (idp_a, idp_b) = (TestIdp::start(&[&ka]).await, TestIdp::start(&[&kb]).await);
    let verifier = ready([settings(&idp_a), settings(&idp_b)]).await;
    let mut names: Vec<_> = verifier.issuers().collect();
    names.sort_unstable();
    assert_eq!(names.len(), 2);

    let a = verifier
        .verify(&ka.token(&claims(&idp_a.issuer)))
        .await
        .unwrap();
    let b = verifier
        .verify(&kb.token(&claims(&idp_b.issuer)))
        .await
        .unwrap();
    assert_eq!(
        (&*a.issuer, &*b.issuer),
        (idp_a.issuer.as_str(), idp_b.issuer.as_str())
    );
    // A's key signing a token that claims to come from B: B has no such key.
    let forged = ka.token(&claims(&idp_b.issuer));
    assert_eq!(refused(&verifier, &forged).await, VerifyError::UnknownKid);
    assert_eq!((idp_a.jwks_hits(), idp_b.jwks_hits()), (1, 2));
}

#[tokio::test]
async fn https_with_a_custom_ca() {
    let key = TestKey::es256("ec");
    let (idp, ca_file) = TestIdp::start_tls(&[&key]).await;
    assert!(idp.issuer.starts_with("https://127.0.0.1:"));

    let untrusted = Verifier::new([settings(&idp)]).unwrap();
    let results = untrusted.refresh_all().await;
    assert!(
        matches!(results[0].1, Err(FetchError::Http { .. })),
        "{:?}",
        results[0].1
    );
    assert_eq!(idp.discovery_hits(), 0);

    let mut s = settings(&idp);
    s.ca_file = Some(ca_file.clone());
    let trusted = ready([s]).await;
    trusted
        .verify(&key.token(&claims(&idp.issuer)))
        .await
        .unwrap();
    assert_eq!((idp.discovery_hits(), idp.jwks_hits()), (1, 1));
    let _ = std::fs::remove_file(ca_file);
}

#[tokio::test]
async fn configuration_errors() {
    let idp = TestIdp::start(&[]).await;
    assert!(matches!(
        Verifier::new([]),
        Err(super::ConfigError::NoIssuers)
    ));
    assert!(matches!(
        Verifier::new([settings(&idp), settings(&idp)]),
        Err(super::ConfigError::DuplicateIssuer(_))
    ));
    let mut s = settings(&idp);
    s.ca_file = Some("/nonexistent/idgate-ca.pem".into());
    assert!(matches!(
        Verifier::new([s]),
        Err(super::ConfigError::CaFile { .. })
    ));
    let empty_pem = std::env::temp_dir().join(format!("idgate-empty-{}.pem", std::process::id()));
    std::fs::write(&empty_pem, "no certificates here").unwrap();
    let mut s = settings(&idp);
    s.ca_file = Some(empty_pem.clone());
    assert!(matches!(
        Verifier::new([s]),
        Err(super::ConfigError::CaParse { .. })
    ));
    let _ = std::fs::remove_file(empty_pem);
}

#[test]
fn the_verifier_can_be_shared_across_tasks() {
    fn assert_send_sync<T: Send + Sync>(_: &T) {}
    fn assert_send<T: Send>(_: T) {}
    let verifier = Verifier::new([IssuerSettings::new("https://idp.example", ["idgate"])]).unwrap();
    assert_send_sync(&verifier);
    assert_send(verifier.verify("a.b.c"));
    assert_send(verifier.refresh_all());
}

#[test]
fn bearer_tokens_are_taken_from_the_authorization_header() {
    use super::bearer_token;
    assert_eq!(bearer_token(Some("Bearer abc.def.ghi")), Ok("abc.def.ghi"));
    assert_eq!(bearer_token(Some("bearer   abc")), Ok("abc"));
    assert_eq!(bearer_token(None), Err(VerifyError::MissingToken));
    assert_eq!(
        bearer_token(Some("Basic dXNlcjpwYXNz")),
        Err(VerifyError::MissingToken)
    );
    assert_eq!(bearer_token(Some("Bearer")), Err(VerifyError::MissingToken));
    assert_eq!(
        bearer_token(Some("Bearer a b")).unwrap_err().reason(),
        "malformed"
    );
    assert_eq!(
        bearer_token(Some("Bearer a\"b")).unwrap_err().reason(),
        "malformed"
    );
}
