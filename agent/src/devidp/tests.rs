//! The dev IdP over HTTP on 127.0.0.1, and the key test: what it issues, idgate's own
//! [`Verifier`] accepts, with the same user and groups.

use std::time::{Duration, Instant};

use base64::{
    Engine as _,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use reqwest::{StatusCode, header::HeaderMap};
use serde_json::Value;
use url::form_urlencoded;

use super::*;
use crate::identity::{IssuerSettings, Verifier};

const CONFIG: &str = r#"
[[clients]]
client_id = "alice"
client_secret = "alice-secret"
subject = "alice@example.com"
groups = ["engineering", "ssh-users"]
scopes = ["ssh", "metrics"]
audience = "api://idgate"
token_lifetime = "10m"

[[clients]]
client_id = "bob"
client_secret = "bob secret&=:%"
groups = ["contractors"]
audience = ["api://other", "api://idgate"]
token_lifetime = "1m"
"#;

const AUDIENCE: &str = "api://idgate";

fn options() -> Options {
    Options {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Options::default()
    }
}

async fn start(options: Options) -> DevIdp {
    DevIdp::start(DevIdpConfig::parse(CONFIG).unwrap(), options)
        .await
        .unwrap()
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// HTTP Basic credentials as RFC 6749 §2.3.1 has clients send them.
fn basic(id: &str, secret: &str) -> String {
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    format!(
        "Basic {}",
        STANDARD.encode(format!("{}:{}", enc(id), enc(secret)))
    )
}

/// POSTs a form to the token endpoint, with an Authorization header if given.
async fn post_token(
    idp: &DevIdp,
    authorization: Option<&str>,
    form: &[(&str, &str)],
) -> (StatusCode, HeaderMap, Value) {
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    let mut request = http()
        .post(idp.token_endpoint())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body);
    if let Some(a) = authorization {
        request = request.header("authorization", a);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    let json = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text:?}"));
    (status, headers, json)
}

async fn get_json(url: &str) -> Value {
    let response = http().get(url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "{url}");
    assert_eq!(response.headers()["content-type"], "application/json");
    serde_json::from_str(&response.text().await.unwrap()).unwrap()
}

/// A token for a client by HTTP Basic, optionally asking for a scope.
async fn mint(idp: &DevIdp, id: &str, secret: &str, scope: Option<&str>) -> String {
    let mut form = vec![("grant_type", "client_credentials")];
    if let Some(scope) = scope {
        form.push(("scope", scope));
    }
    let (status, _, body) = post_token(idp, Some(&basic(id, secret)), &form).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["access_token"].as_str().unwrap().to_owned()
}

fn header(token: &str) -> Value {
    let part = token.split('.').next().unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

/// Settings an operator would write for this dev IdP.
fn settings(idp: &DevIdp) -> IssuerSettings {
    let mut s = IssuerSettings::new(idp.issuer(), [AUDIENCE]);
    s.require_typ_at_jwt = true;
    s.algorithms = vec![idp.alg().algorithm()];
    s
}

async fn ready(settings: IssuerSettings) -> Verifier {
    let verifier = Verifier::new([settings]).unwrap();
    for (issuer, result) in verifier.refresh_all().await {
        result.unwrap_or_else(|e| panic!("{issuer}: {e}"));
    }
    verifier
}

#[tokio::test]
async fn discovery_names_the_endpoints_and_what_is_supported() {
    let idp = start(options()).await;
    let issuer = format!("http://{}", idp.local_addr());
    assert_eq!(idp.issuer(), issuer);
    let d = get_json(&idp.discovery_url()).await;
    assert_eq!(d["issuer"], issuer.as_str());
    assert_eq!(d["jwks_uri"], format!("{issuer}/jwks"));
    assert_eq!(d["token_endpoint"], format!("{issuer}/token"));
    assert_eq!(
        d["id_token_signing_alg_values_supported"],
        serde_json::json!(["ES256"])
    );
    assert_eq!(
        d["grant_types_supported"],
        serde_json::json!(["client_credentials"])
    );
    assert_eq!(
        d["token_endpoint_auth_methods_supported"],
        serde_json::json!(["client_secret_basic", "client_secret_post"])
    );
    assert_eq!(d["scopes_supported"], serde_json::json!(["ssh", "metrics"]));
}

#[tokio::test]
async fn the_key_set_holds_the_public_signing_key_only() {
    for alg in [SigningAlg::Es256, SigningAlg::EdDsa, SigningAlg::Rs256] {
        let idp = start(Options { alg, ..options() }).await;
        let jwks = get_json(&format!("{}/jwks", idp.issuer())).await;
        let keys = jwks["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 1, "{alg}: {jwks}");
        let key = keys[0].as_object().unwrap();
        assert_eq!(key["kid"], idp.active_kid().as_str());
        assert_eq!(key["alg"], alg.name());
        assert_eq!(key["use"], "sig");
        for private in ["d", "p", "q", "dp", "dq", "qi"] {
            assert!(!key.contains_key(private), "{alg}: {private} is published");
        }
    }
}

#[tokio::test]
async fn tokens_are_issued_with_basic_and_with_form_authentication() {
    let idp = start(options()).await;
    // bob's secret has characters that must be form-encoded inside the Basic credentials.
    let (status, headers, by_basic) = post_token(
        &idp,
        Some(&basic("bob", "bob secret&=:%")),
        &[("grant_type", "client_credentials")],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{by_basic}");
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(by_basic["token_type"], "Bearer");
    assert_eq!(by_basic["expires_in"], 60);
    assert!(by_basic.get("scope").is_none(), "bob has no scopes");

    let (status, _, by_form) = post_token(
        &idp,
        None,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", "alice"),
            ("client_secret", "alice-secret"),
            ("scope", "metrics"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{by_form}");
    assert_eq!(by_form["expires_in"], 600);
    assert_eq!(by_form["scope"], "metrics");
    let token = by_form["access_token"].as_str().unwrap();
    let h = header(token);
    assert_eq!(
        (&h["typ"], &h["alg"], &h["kid"]),
        (
            &"at+jwt".into(),
            &"ES256".into(),
            &idp.active_kid().as_str().into()
        )
    );
}

#[tokio::test]
async fn the_token_endpoint_refuses_with_rfc6749_errors() {
    let idp = start(options()).await;
    let grant = ("grant_type", "client_credentials");
    // (what, Authorization header, form, expected status, expected error)
    type Form = Vec<(&'static str, &'static str)>;
    let cases: Vec<(&str, Option<String>, Form, StatusCode, &str)> = vec![
        (
            "wrong secret, Basic",
            Some(basic("alice", "nope")),
            vec![grant],
            StatusCode::UNAUTHORIZED,
            "invalid_client",
        ),
        (
            "wrong secret, form",
            None,
            vec![grant, ("client_id", "alice"), ("client_secret", "nope")],
            StatusCode::UNAUTHORIZED,
            "invalid_client",
        ),
        (
            "unknown client",
            Some(basic("mallory", "alice-secret")),
            vec![grant],
            StatusCode::UNAUTHORIZED,
            "invalid_client",
        ),
        (
            "no credentials",
            None,
            vec![grant],
            StatusCode::UNAUTHORIZED,
            "invalid_client",
        ),
        (
            "two methods",
            Some(basic("alice", "alice-secret")),
            vec![
                grant,
                ("client_id", "alice"),
                ("client_secret", "alice-secret"),
            ],
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "another grant",
            Some(basic("alice", "alice-secret")),
            vec![("grant_type", "password")],
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
        ),
        (
            "no grant",
            Some(basic("alice", "alice-secret")),
            vec![],
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "a scope not allowed",
            Some(basic("alice", "alice-secret")),
            vec![grant, ("scope", "ssh admin")],
            StatusCode::BAD_REQUEST,
            "invalid_scope",
        ),
        (
            "repeated parameter",
            Some(basic("alice", "alice-secret")),
            vec![grant, grant],
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
    ];
    for (what, authorization, form, status, error) in cases {
        let (got, headers, body) = post_token(&idp, authorization.as_deref(), &form).await;
        assert_eq!(
            (got, body["error"].as_str()),
            (status, Some(error)),
            "{what}: {body}"
        );
        assert!(body["error_description"].is_string(), "{what}");
        assert!(body.get("access_token").is_none(), "{what}");
        if status == StatusCode::UNAUTHORIZED {
            assert_eq!(
                headers["www-authenticate"], "Basic realm=\"idgate dev-idp\"",
                "{what}"
            );
        }
    }

    let json_body = http()
        .post(idp.token_endpoint())
        .header("authorization", basic("alice", "alice-secret"))
        .header("content-type", "application/json")
        .body(r#"{"grant_type":"client_credentials"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(json_body.status(), StatusCode::BAD_REQUEST);
    let get = http().get(idp.token_endpoint()).send().await.unwrap();
    assert_eq!(get.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(get.headers()["allow"], "POST");
    let rotate = http()
        .post(format!("{}/rotate", idp.issuer()))
        .send()
        .await
        .unwrap();
    assert_eq!(
        rotate.status(),
        StatusCode::NOT_FOUND,
        "no rotation unless allowed"
    );
}

#[tokio::test]
async fn issued_tokens_verify_with_idgates_verifier() {
    for alg in [SigningAlg::Es256, SigningAlg::EdDsa, SigningAlg::Rs256] {
        let idp = start(Options { alg, ..options() }).await;
        let verifier = ready(settings(&idp)).await;

        let token = mint(&idp, "alice", "alice-secret", None).await;
        let alice = verifier
            .verify(&token)
            .await
            .unwrap_or_else(|e| panic!("{alg}: {e}"));
        assert_eq!(&*alice.issuer, idp.issuer());
        assert_eq!(alice.user, "alice@example.com");
        assert_eq!(alice.groups, ["engineering", "ssh-users"]);
        assert_eq!(
            alice.scopes,
            ["ssh", "metrics"],
            "all scopes when none asked"
        );
        let c = &alice.claims;
        assert_eq!(c["client_id"], "alice");
        assert_eq!(c["aud"], AUDIENCE);
        assert_eq!(c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(), 600);
        assert_eq!(c["nbf"], c["iat"]);
        assert_eq!(
            URL_SAFE_NO_PAD
                .decode(c["jti"].as_str().unwrap())
                .unwrap()
                .len(),
            16
        );

        let narrowed = verifier
            .verify(&mint(&idp, "alice", "alice-secret", Some("ssh")).await)
            .await
            .unwrap();
        assert_eq!(narrowed.scopes, ["ssh"]);

        let bob = verifier
            .verify(&mint(&idp, "bob", "bob secret&=:%", None).await)
            .await
            .unwrap();
        assert_eq!(
            (bob.user.as_str(), bob.groups.as_slice()),
            ("bob", &["contractors".to_owned()][..])
        );
        assert!(bob.scopes.is_empty());
    }
}

#[tokio::test]
async fn the_verifier_refuses_a_token_for_another_audience_or_issuer() {
    let idp = start(options()).await;
    let token = mint(&idp, "alice", "alice-secret", None).await;
    let mut other_audience = settings(&idp);
    other_audience.audiences = vec!["api://other".into()];
    let e = ready(other_audience)
        .await
        .verify(&token)
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "wrong_audience");

    // A second dev IdP is another issuer with other keys: its tokens are not the first one's.
    let impostor = start(options()).await;
    let forged = mint(&impostor, "alice", "alice-secret", None).await;
    let e = ready(settings(&idp))
        .await
        .verify(&forged)
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "unknown_issuer");
}

#[tokio::test]
async fn an_issuer_path_prefixes_every_endpoint() {
    // Port 0 cannot be part of an issuer, so reserve a free port and hand it over.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let issuer = format!("http://127.0.0.1:{port}/realms/dev");
    let idp = start(Options {
        listen: format!("127.0.0.1:{port}").parse().unwrap(),
        issuer: Some(issuer.clone()),
        ..options()
    })
    .await;
    assert_eq!(idp.token_endpoint(), format!("{issuer}/token"));
    let d = get_json(&format!("{issuer}/.well-known/openid-configuration")).await;
    assert_eq!(d["jwks_uri"], format!("{issuer}/jwks"));
    let outside = http()
        .get(format!("http://127.0.0.1:{port}/jwks"))
        .send()
        .await
        .unwrap();
    assert_eq!(outside.status(), StatusCode::NOT_FOUND);
    let token = mint(&idp, "alice", "alice-secret", None).await;
    let verified = ready(settings(&idp)).await.verify(&token).await.unwrap();
    assert_eq!(&*verified.issuer, issuer);
}

#[tokio::test]
async fn after_rotation_new_tokens_verify_and_old_ones_still_do_during_grace() {
    let idp = start(Options {
        allow_rotate: true,
        ..options()
    })
    .await;
    assert_eq!(
        idp.rotation_grace(),
        Duration::from_secs(600 + 60),
        "longest lifetime plus a minute"
    );
    let verifier = ready(settings(&idp)).await;
    let old_kid = idp.active_kid();
    let before = mint(&idp, "alice", "alice-secret", None).await;
    verifier.verify(&before).await.unwrap();

    let response = http()
        .post(idp.rotation_endpoint().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let rotation: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert_eq!(rotation["previous"], old_kid.as_str());
    let new_kid = rotation["kid"].as_str().unwrap();
    assert_ne!(new_kid, old_kid);
    assert_eq!(idp.active_kid(), new_kid);

    let after = mint(&idp, "alice", "alice-secret", None).await;
    assert_eq!(header(&after)["kid"], new_kid);
    let verified = verifier.verify(&after).await.unwrap();
    assert_eq!(verified.groups, ["engineering", "ssh-users"]);
    let stats = verifier.stats().remove(0);
    assert_eq!(stats.unknown_kid_refetches, 1, "{stats:?}");
    assert_eq!(stats.keys, 2, "both keys are published: {stats:?}");
    verifier
        .verify(&before)
        .await
        .expect("the old key's token verifies during the grace period");
}

#[tokio::test]
async fn a_retired_key_leaves_the_key_set_when_its_grace_period_ends() {
    let idp = start(Options {
        rotation_grace: Some(Duration::from_millis(300)),
        ..options()
    })
    .await;
    let before = mint(&idp, "alice", "alice-secret", None).await;
    let old_kid = idp.active_kid();
    let new_kid = idp.rotate().await.unwrap();
    let jwks_url = format!("{}/jwks", idp.issuer());
    let kids = |jwks: Value| -> Vec<String> {
        jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_owned())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut published = kids(get_json(&jwks_url).await);
    // Published right after rotating (unless this machine stalled for the whole grace period).
    assert!(published.contains(&new_kid), "{published:?}");
    while published.len() > 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        published = kids(get_json(&jwks_url).await);
    }
    assert_eq!(published, [new_kid]);
    let e = ready(settings(&idp))
        .await
        .verify(&before)
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "unknown_kid", "the token of {old_kid}");
}

#[tokio::test]
async fn start_refuses_unusable_issuers_and_busy_ports() {
    let config = || DevIdpConfig::parse(CONFIG).unwrap();
    for issuer in ["not a url", "ftp://127.0.0.1/x", "http://127.0.0.1:1/?q=1"] {
        let e = DevIdp::start(
            config(),
            Options {
                issuer: Some(issuer.into()),
                ..options()
            },
        )
        .await
        .unwrap_err();
        assert!(matches!(e, DevIdpError::Issuer { .. }), "{issuer}: {e}");
    }
    let wildcard = DevIdp::start(
        config(),
        Options {
            listen: "0.0.0.0:0".parse().unwrap(),
            ..options()
        },
    )
    .await
    .unwrap_err();
    assert!(wildcard.to_string().contains("--issuer"), "{wildcard}");

    let first = start(options()).await;
    let busy = DevIdp::start(
        config(),
        Options {
            listen: first.local_addr(),
            ..options()
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(busy, DevIdpError::Bind { .. }), "{busy}");
}
