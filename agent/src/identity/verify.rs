//! Verifying one token against one issuer (RFC 7519, RFC 8725, RFC 9068): parsing with every
//! size and shape check first, then the key, the signature, and only then the claims.

use std::{
    borrow::Cow,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, AlgorithmFamily, errors::ErrorKind};
use serde::{Deserialize, de::IgnoredAny};
use serde_json::{Map, Value};

use super::{
    cache::KeyCache,
    error::VerifyError,
    jwks::Lookup,
    settings::{ClaimFormat, IssuerSettings},
};

/// What a verified token says about its holder.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifiedToken {
    /// The issuer that signed it (shared with the issuer's settings, so not copied per token).
    pub issuer: Arc<str>,
    /// The `sub` claim.
    pub subject: String,
    /// The configured user claim (`sub` unless configured otherwise).
    pub user: String,
    /// Group names from every configured group claim, deduplicated, in order of appearance.
    pub groups: Vec<String>,
    /// Scopes from `scope` (space-separated) and `scp` (string or array), deduplicated.
    pub scopes: Vec<String>,
    /// The `exp` claim.
    pub expires_at: SystemTime,
    /// Every claim, for policy rules that need more.
    pub claims: Value,
}

/// The three parts of a compact JWS, still encoded.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Parts<'t> {
    pub(crate) header: &'t str,
    pub(crate) payload: &'t str,
    pub(crate) signature: &'t str,
    /// `header.payload`, the bytes the signature covers.
    pub(crate) signing_input: &'t str,
}

/// Splits a compact JWS; anything else (a JWE's five parts, a JSON serialization) is malformed.
pub(crate) fn split(token: &str) -> Result<Parts<'_>, VerifyError> {
    const SHAPE: VerifyError = VerifyError::Malformed("not three dot-separated parts");
    let (signing_input, signature) = token.rsplit_once('.').ok_or(SHAPE)?;
    let (header, payload) = signing_input.split_once('.').ok_or(SHAPE)?;
    if header.is_empty() || payload.is_empty() || payload.contains('.') {
        return Err(SHAPE);
    }
    Ok(Parts {
        header,
        payload,
        signature,
        signing_input,
    })
}

/// The header fields idgate reads; borrowed from the decoded header where JSON allows. Key
/// references (`jku`, `jwk`, `x5u`, `x5c`) are deliberately ignored: keys come only from the
/// configured issuer's key set (RFC 8725 §3.10).
#[derive(Deserialize)]
pub(crate) struct Header<'h> {
    #[serde(borrow)]
    alg: Cow<'h, str>,
    #[serde(default, borrow)]
    kid: Option<Cow<'h, str>>,
    #[serde(default, borrow)]
    typ: Option<Cow<'h, str>>,
    /// RFC 7515 §4.1.11: a recipient must refuse critical extensions it does not understand,
    /// and idgate understands none.
    #[serde(default)]
    crit: Option<IgnoredAny>,
}

impl Header<'_> {
    /// The signing algorithm, if it is one idgate ever accepts: `none`, HMAC (the public-key /
    /// shared-secret confusion) and unknown names are refused here, before any key is looked at.
    pub(crate) fn algorithm(&self) -> Result<Algorithm, VerifyError> {
        if self.crit.is_some() {
            return Err(VerifyError::UnsupportedHeader);
        }
        match self.alg.parse::<Algorithm>() {
            Ok(alg) if alg.family() != AlgorithmFamily::Hmac => Ok(alg),
            _ => Err(VerifyError::AlgNotAllowed),
        }
    }
}

/// Decodes one base64url part (no padding, canonical trailing bits).
pub(crate) fn decode_part(part: &str, what: &'static str) -> Result<Vec<u8>, VerifyError> {
    URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| VerifyError::Malformed(what))
}

/// Parses the decoded header.
pub(crate) fn parse_header(json: &[u8]) -> Result<Header<'_>, VerifyError> {
    serde_json::from_slice(json).map_err(|_| VerifyError::Malformed("header is not a JWS header"))
}

/// Decodes and parses the claims; they must be a JSON object.
pub(crate) fn parse_claims(payload: &str) -> Result<Value, VerifyError> {
    let json = decode_part(payload, "payload is not base64url")?;
    match serde_json::from_slice(&json) {
        Ok(claims @ Value::Object(_)) => Ok(claims),
        _ => Err(VerifyError::Malformed("payload is not a JSON object")),
    }
}

/// One configured issuer: its settings and its keys.
pub(crate) struct Issuer {
    pub(crate) settings: IssuerSettings,
    pub(crate) name: Arc<str>,
    pub(crate) keys: Arc<KeyCache>,
}

impl Issuer {
    /// Verifies a token already split and parsed by the caller, which picked this issuer by the
    /// token's unverified `iss`.
    pub(crate) async fn verify(
        &self,
        parts: &Parts<'_>,
        header: &Header<'_>,
        alg: Algorithm,
        claims: Value,
        now: SystemTime,
    ) -> Result<VerifiedToken, VerifyError> {
        let s = &self.settings;
        let token_len = parts.signing_input.len() + 1 + parts.signature.len();
        if token_len > s.max_token_bytes {
            return Err(VerifyError::TokenTooLarge {
                max: s.max_token_bytes,
            });
        }
        if !s.algorithms.contains(&alg) {
            return Err(VerifyError::AlgNotAllowed);
        }

        let kid = header.kid.as_deref();
        let mut keys = self.keys.current();
        if keys.select(kid, alg).err() == Some(Lookup::Unknown) {
            keys = self.keys.refetch_for_unknown_kid(keys.generation).await;
        }
        let key = keys.select(kid, alg).map_err(|lookup| match lookup {
            Lookup::Unknown if keys.generation == 0 => VerifyError::IdpUnavailable,
            Lookup::Unknown => VerifyError::UnknownKid,
            Lookup::MissingKid => VerifyError::MissingKid,
            Lookup::Mismatch => VerifyError::KeyMismatch,
        })?;
        match jsonwebtoken::crypto::verify(
            parts.signature,
            parts.signing_input.as_bytes(),
            key,
            alg,
        ) {
            Ok(true) => {}
            Ok(false) => return Err(VerifyError::BadSignature),
            Err(e) if matches!(e.kind(), ErrorKind::Base64(_)) => {
                return Err(VerifyError::Malformed("signature is not base64url"));
            }
            Err(_) => return Err(VerifyError::BadSignature),
        }

        // Authentic from here on; what is left is whether it is meant for us, now.
        if s.require_typ_at_jwt && !header.typ.as_deref().is_some_and(is_at_jwt) {
            return Err(VerifyError::WrongTyp);
        }
        let map = claims
            .as_object()
            .ok_or(VerifyError::Malformed("payload is not a JSON object"))?;
        if map.get("iss").and_then(Value::as_str) != Some(&*self.name) {
            return Err(VerifyError::WrongIssuer);
        }
        let now = now
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let leeway = s.leeway.as_secs_f64();
        let exp =
            numeric_date(map, "exp", "exp is not a number")?.ok_or(VerifyError::MissingExp)?;
        // RFC 7519 §4.1.4: the current time must be before `exp`.
        if now >= exp + leeway {
            return Err(VerifyError::Expired);
        }
        if numeric_date(map, "nbf", "nbf is not a number")?.is_some_and(|nbf| now + leeway < nbf) {
            return Err(VerifyError::NotYetValid);
        }
        if numeric_date(map, "iat", "iat is not a number")?.is_some_and(|iat| iat > now + leeway) {
            return Err(VerifyError::IssuedInFuture);
        }
        if !audience_matches(map.get("aud"), &s.audiences) {
            return Err(VerifyError::WrongAudience);
        }
        let expires_at = Duration::try_from_secs_f64(exp)
            .ok()
            .and_then(|d| UNIX_EPOCH.checked_add(d))
            .ok_or(VerifyError::Malformed("exp is out of range"))?;

        let subject = non_empty_str(map.get("sub")).ok_or(VerifyError::MissingClaim)?;
        let user = non_empty_str(claim_at(map, &s.user_claim)).ok_or(VerifyError::MissingClaim)?;
        let mut groups = Vec::new();
        for source in &s.group_claims {
            if let Some(value) = claim_at(map, &source.claim) {
                collect_strings(value, source.format, &mut groups);
            }
        }
        let mut scopes = Vec::new();
        for name in ["scope", "scp"] {
            if let Some(value) = map.get(name) {
                collect_strings(value, ClaimFormat::SpaceSeparated, &mut scopes);
            }
        }
        Ok(VerifiedToken {
            issuer: self.name.clone(),
            subject: subject.to_owned(),
            user: user.to_owned(),
            groups,
            scopes,
            expires_at,
            claims,
        })
    }
}

/// RFC 9068 §4: `at+jwt`, media types compared case-insensitively, with or without the
/// `application/` prefix (RFC 7515 §4.1.9).
fn is_at_jwt(typ: &str) -> bool {
    typ.eq_ignore_ascii_case("at+jwt") || typ.eq_ignore_ascii_case("application/at+jwt")
}

/// A NumericDate claim (RFC 7519 §2: seconds, possibly fractional); absent is `None`, anything
/// but a finite number is malformed.
fn numeric_date(
    claims: &Map<String, Value>,
    name: &str,
    malformed: &'static str,
) -> Result<Option<f64>, VerifyError> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|f| f.is_finite())
            .map(Some)
            .ok_or(VerifyError::Malformed(malformed)),
    }
}

/// RFC 7519 §4.1.3: `aud` is one string or an array of strings, and one of them must be ours.
fn audience_matches(aud: Option<&Value>, accepted: &[String]) -> bool {
    let ours = |a: &str| accepted.iter().any(|x| x == a);
    match aud {
        Some(Value::String(a)) => ours(a),
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).any(ours),
        _ => false,
    }
}

fn non_empty_str(value: Option<&Value>) -> Option<&str> {
    value.and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// Looks a claim up by its whole name first (namespaced claims contain dots), then as a dotted
/// path through nested objects (`realm_access.roles`).
pub(crate) fn claim_at<'v>(claims: &'v Map<String, Value>, path: &str) -> Option<&'v Value> {
    if let Some(value) = claims.get(path) {
        return Some(value);
    }
    let (first, rest) = path.split_once('.')?;
    let mut value = claims.get(first)?;
    for segment in rest.split('.') {
        value = value.as_object()?.get(segment)?;
    }
    Some(value)
}

/// Adds the strings a claim holds to `out`, skipping empty ones and ones already there. The
/// linear duplicate check is fine: lists are short and bounded by the token size limit, and
/// only signed tokens get here.
fn collect_strings(value: &Value, format: ClaimFormat, out: &mut Vec<String>) {
    let mut push = |s: &str| {
        if !s.is_empty() && !out.iter().any(|g| g == s) {
            out.push(s.to_owned());
        }
    };
    match (value, format) {
        (Value::Array(items), _) => items.iter().filter_map(Value::as_str).for_each(push),
        (Value::String(s), ClaimFormat::Array) => push(s),
        (Value::String(s), ClaimFormat::SpaceSeparated) => {
            s.split_ascii_whitespace().for_each(push)
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn split_accepts_only_three_parts() {
        let p = split("aaa.bbb.ccc").unwrap();
        assert_eq!(
            (p.header, p.payload, p.signature, p.signing_input),
            ("aaa", "bbb", "ccc", "aaa.bbb")
        );
        assert!(
            split("aaa.bbb.").is_ok(),
            "an empty signature is judged after the alg check"
        );
        for bad in [
            "",
            "aaa",
            "aaa.bbb",
            ".bbb.ccc",
            "aaa..ccc",
            "a.b.c.d.e",
            "a.b.c.d",
        ] {
            assert_eq!(split(bad).unwrap_err().reason(), "malformed", "{bad}");
        }
    }

    #[test]
    fn header_alg_refuses_none_hmac_unknown_and_crit() {
        let alg = |h: Value| {
            let json = h.to_string();
            parse_header(json.as_bytes()).and_then(|h| h.algorithm())
        };
        assert_eq!(alg(json!({"alg": "RS256"})), Ok(Algorithm::RS256));
        assert_eq!(
            alg(json!({"alg": "EdDSA", "kid": "k"})),
            Ok(Algorithm::EdDSA)
        );
        for bad in [
            "none", "None", "NONE", "HS256", "HS384", "HS512", "rs256", "ES512", "",
        ] {
            assert_eq!(
                alg(json!({"alg": bad})),
                Err(VerifyError::AlgNotAllowed),
                "{bad}"
            );
        }
        assert_eq!(
            alg(json!({"alg": "RS256", "crit": ["exp"]})),
            Err(VerifyError::UnsupportedHeader)
        );
        assert_eq!(alg(json!({"kid": "k"})).unwrap_err().reason(), "malformed");
        assert_eq!(alg(json!({"alg": 5})).unwrap_err().reason(), "malformed");
    }

    #[test]
    fn header_strings_with_escapes_still_parse() {
        let h = parse_header(br#"{"alg":"RS256","kid":"a\"b","typ":"at\u002bjwt"}"#).unwrap();
        assert_eq!(h.kid.as_deref(), Some("a\"b"));
        assert!(is_at_jwt(h.typ.as_deref().unwrap()));
    }

    #[test]
    fn typ_at_jwt_variants() {
        for ok in [
            "at+jwt",
            "AT+JWT",
            "application/at+jwt",
            "Application/At+Jwt",
        ] {
            assert!(is_at_jwt(ok), "{ok}");
        }
        for bad in [
            "JWT",
            "jwt",
            "at+jwt ",
            "application/jwt",
            "id_token+jwt",
            "",
        ] {
            assert!(!is_at_jwt(bad), "{bad}");
        }
    }

    #[test]
    fn claims_must_be_an_object() {
        assert!(parse_claims(&URL_SAFE_NO_PAD.encode(b"{\"a\":1}")).is_ok());
        for bad in [&b"[1]"[..], b"\"s\"", b"{", b""] {
            assert_eq!(
                parse_claims(&URL_SAFE_NO_PAD.encode(bad))
                    .unwrap_err()
                    .reason(),
                "malformed"
            );
        }
        assert_eq!(
            parse_claims("e30=").unwrap_err().reason(),
            "malformed",
            "padding is refused"
        );
    }

    #[test]
    fn audience_string_or_array() {
        let ours = ["api".to_owned(), "idgate".to_owned()];
        assert!(audience_matches(Some(&json!("idgate")), &ours));
        assert!(audience_matches(Some(&json!(["other", 5, "api"])), &ours));
        assert!(!audience_matches(Some(&json!(["other"])), &ours));
        assert!(!audience_matches(Some(&json!("IDGATE")), &ours));
        assert!(!audience_matches(Some(&json!({"idgate": true})), &ours));
        assert!(!audience_matches(None, &ours));
    }

    #[test]
    fn claim_paths_whole_name_first_then_dotted() {
        let m = obj(json!({
            "realm_access": {"roles": ["a"]},
            "https://example.com/groups": ["b"],
            "x": {"y": {"z": "deep"}},
            "s": "not an object",
        }));
        assert_eq!(claim_at(&m, "realm_access.roles"), Some(&json!(["a"])));
        assert_eq!(
            claim_at(&m, "https://example.com/groups"),
            Some(&json!(["b"]))
        );
        assert_eq!(claim_at(&m, "x.y.z"), Some(&json!("deep")));
        assert_eq!(claim_at(&m, "x.y.nope"), None);
        assert_eq!(claim_at(&m, "s.t"), None);
        assert_eq!(claim_at(&m, "missing"), None);
    }

    #[test]
    fn strings_are_collected_per_format_and_deduplicated() {
        let mut out = Vec::new();
        collect_strings(&json!(["a", "b", 3, "a", ""]), ClaimFormat::Array, &mut out);
        collect_strings(&json!("c d"), ClaimFormat::Array, &mut out);
        collect_strings(&json!("b  e\tf"), ClaimFormat::SpaceSeparated, &mut out);
        collect_strings(&json!(["g", "a"]), ClaimFormat::SpaceSeparated, &mut out);
        collect_strings(&json!({"h": 1}), ClaimFormat::Array, &mut out);
        assert_eq!(out, ["a", "b", "c d", "e", "f", "g"]);
    }

    #[test]
    fn numeric_dates_must_be_finite_numbers() {
        let m = obj(json!({"exp": 1.5, "nbf": "soon", "iat": null}));
        assert_eq!(numeric_date(&m, "exp", "x"), Ok(Some(1.5)));
        assert_eq!(
            numeric_date(&m, "nbf", "nbf bad"),
            Err(VerifyError::Malformed("nbf bad"))
        );
        assert_eq!(
            numeric_date(&m, "iat", "iat bad"),
            Err(VerifyError::Malformed("iat bad"))
        );
        assert_eq!(numeric_date(&m, "other", "x"), Ok(None));
    }
}
