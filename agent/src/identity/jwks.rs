//! A parsed JSON Web Key Set (RFC 7517): the issuer's public keys by `kid`, each with what it may
//! verify, decided once when the set is loaded rather than per token.

use std::collections::HashMap;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use serde_json::Value;

/// Keys kept from one set; more is a broken or hostile IdP, and each key costs memory.
const MAX_KEYS: usize = 100;
/// RFC 8725 §3.5 / NIST: shorter RSA keys are not safe.
const MIN_RSA_BITS: usize = 2048;

/// The curve or key type a JWK carries, which decides the one algorithm family it can verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KeyType {
    Rsa,
    P256,
    P384,
    Ed25519,
}

/// One verification key.
#[derive(Debug)]
pub(crate) struct KeyEntry {
    key_type: KeyType,
    /// The JWK's `alg`: `None` when absent, `Some(None)` when it names no signing algorithm
    /// (`RSA-OAEP`, ...), so that such a key can never verify.
    alg: Option<Option<Algorithm>>,
    /// `use` is absent or `sig`, and `key_ops` is absent or contains `verify`.
    for_signatures: bool,
    key: DecodingKey,
}

impl KeyEntry {
    /// RFC 8725 §3.1: a key is used only with the algorithm family it was made for, and within
    /// what its own `alg`/`use`/`key_ops` allow.
    fn fits(&self, alg: Algorithm) -> bool {
        let type_fits = match alg {
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => self.key_type == KeyType::Rsa,
            Algorithm::ES256 => self.key_type == KeyType::P256,
            Algorithm::ES384 => self.key_type == KeyType::P384,
            Algorithm::EdDSA => self.key_type == KeyType::Ed25519,
            // HMAC: never with a published key (the RS256/HS256 confusion).
            _ => false,
        };
        type_fits && self.for_signatures && self.alg.is_none_or(|a| a == Some(alg))
    }
}

/// Why no key was found for a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// No key has the token's `kid` (or the set is empty).
    Unknown,
    /// The token names no key and the set has several.
    MissingKid,
    /// Keys with that `kid` exist but none fits the algorithm.
    Mismatch,
}

/// An issuer's keys at one point in time.
#[derive(Debug, Default)]
pub(crate) struct KeySet {
    /// Several entries can share a `kid` (e.g. one for `sig`, one for `enc`).
    by_kid: HashMap<String, Vec<KeyEntry>>,
    without_kid: Vec<KeyEntry>,
    len: usize,
    /// 0 for the empty set before the first successful fetch, then 1, 2, ...
    pub(crate) generation: u64,
}

/// The set's document: keys stay untyped so that one odd key does not spoil the others.
#[derive(Deserialize)]
struct RawSet {
    keys: Vec<Value>,
}

#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default, rename = "use")]
    key_use: Option<String>,
    #[serde(default)]
    key_ops: Option<Vec<String>>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
}

impl KeySet {
    /// Parses a key set document, skipping (and logging) keys that cannot verify signatures.
    pub(crate) fn parse(document: &[u8], generation: u64) -> Result<Self, serde_json::Error> {
        let raw: RawSet = serde_json::from_slice(document)?;
        let mut set = KeySet {
            generation,
            ..KeySet::default()
        };
        for (index, raw_key) in raw.keys.iter().enumerate() {
            if set.len == MAX_KEYS {
                tracing::warn!(
                    max = MAX_KEYS,
                    "key set has too many keys; ignoring the rest"
                );
                break;
            }
            let jwk = match RawJwk::deserialize(raw_key) {
                Ok(jwk) => jwk,
                Err(e) => {
                    tracing::warn!(index, error = %e, "skipping an unreadable JWK");
                    continue;
                }
            };
            match entry_from_jwk(&jwk) {
                Ok(entry) => {
                    set.len += 1;
                    match jwk.kid {
                        Some(kid) => set.by_kid.entry(kid).or_default().push(entry),
                        None => set.without_kid.push(entry),
                    }
                }
                Err(why) => {
                    tracing::debug!(index, kid = jwk.kid.as_deref(), why, "skipping a JWK");
                }
            }
        }
        Ok(set)
    }

    /// Number of usable keys.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The key to verify a token with `kid` and `alg` (RFC 8725 §3.1, RFC 7515 §4.1.4).
    pub(crate) fn select(&self, kid: Option<&str>, alg: Algorithm) -> Result<&DecodingKey, Lookup> {
        let candidates: &[KeyEntry] = match kid {
            Some(kid) => self.by_kid.get(kid).ok_or(Lookup::Unknown)?,
            None => match self.len {
                0 => return Err(Lookup::Unknown),
                1 => match self.by_kid.values().next() {
                    Some(entries) => entries,
                    None => &self.without_kid,
                },
                _ => return Err(Lookup::MissingKid),
            },
        };
        candidates
            .iter()
            .find(|e| e.fits(alg))
            .map(|e| &e.key)
            .ok_or(Lookup::Mismatch)
    }
}

fn entry_from_jwk(jwk: &RawJwk) -> Result<KeyEntry, &'static str> {
    let for_signatures = jwk.key_use.as_deref().is_none_or(|u| u == "sig")
        && jwk
            .key_ops
            .as_ref()
            .is_none_or(|ops| ops.iter().any(|o| o == "verify"));
    let alg = jwk.alg.as_deref().map(|a| a.parse::<Algorithm>().ok());
    let b64 = |field: &Option<String>| -> Result<Vec<u8>, &'static str> {
        let text = field.as_deref().ok_or("a key parameter is missing")?;
        URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|_| "a key parameter is not base64url")
    };
    let (key_type, key) = match (jwk.kty.as_str(), jwk.crv.as_deref()) {
        ("RSA", _) => {
            let n = b64(&jwk.n)?;
            let e = b64(&jwk.e)?;
            if modulus_bits(&n) < MIN_RSA_BITS {
                return Err("RSA modulus shorter than 2048 bits");
            }
            if e.iter().all(|b| *b == 0) {
                return Err("RSA exponent is zero");
            }
            (KeyType::Rsa, DecodingKey::from_rsa_raw_components(&n, &e))
        }
        ("EC", Some(crv @ ("P-256" | "P-384"))) => {
            let (key_type, size) = if crv == "P-256" {
                (KeyType::P256, 32)
            } else {
                (KeyType::P384, 48)
            };
            let x = b64(&jwk.x)?;
            let y = b64(&jwk.y)?;
            if x.len() != size || y.len() != size {
                return Err("EC coordinates have the wrong length for the curve");
            }
            let mut point = Vec::with_capacity(1 + 2 * size);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            (key_type, DecodingKey::from_ec_der(&point))
        }
        ("OKP", Some("Ed25519")) => {
            let x = b64(&jwk.x)?;
            if x.len() != 32 {
                return Err("Ed25519 key is not 32 bytes");
            }
            (KeyType::Ed25519, DecodingKey::from_ed_der(&x))
        }
        ("oct", _) => return Err("symmetric keys are never used"),
        _ => return Err("unsupported key type or curve"),
    };
    Ok(KeyEntry {
        key_type,
        alg,
        for_signatures,
        key,
    })
}

fn modulus_bits(n: &[u8]) -> usize {
    let n = match n.iter().position(|b| *b != 0) {
        Some(first) => &n[first..],
        None => return 0,
    };
    n.len() * 8 - n[0].leading_zeros() as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    fn rsa_jwk(kid: &str, bits: usize, extra: serde_json::Value) -> serde_json::Value {
        let mut n = vec![0xffu8; bits / 8];
        n[0] = 0x80;
        let mut jwk = serde_json::json!({"kty": "RSA", "kid": kid, "n": b64(&n), "e": "AQAB"});
        if let (Some(o), Some(extra)) = (jwk.as_object_mut(), extra.as_object()) {
            o.extend(extra.clone());
        }
        jwk
    }

    fn parse(keys: serde_json::Value) -> KeySet {
        KeySet::parse(
            serde_json::json!({ "keys": keys }).to_string().as_bytes(),
            1,
        )
        .unwrap()
    }

    #[test]
    fn key_type_use_and_alg_must_fit() {
        let set = parse(serde_json::json!([
            rsa_jwk("plain", 2048, serde_json::json!({})),
            rsa_jwk("rs256-only", 2048, serde_json::json!({"alg": "RS256", "use": "sig"})),
            rsa_jwk("enc", 2048, serde_json::json!({"use": "enc"})),
            rsa_jwk("oaep", 2048, serde_json::json!({"alg": "RSA-OAEP"})),
            rsa_jwk("ops", 2048, serde_json::json!({"key_ops": ["encrypt"]})),
            {"kty": "EC", "crv": "P-256", "kid": "ec", "x": b64(&[1; 32]), "y": b64(&[2; 32])},
            {"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": b64(&[3; 32])},
        ]));
        assert_eq!(set.len(), 7);
        assert!(set.select(Some("plain"), Algorithm::RS256).is_ok());
        assert!(set.select(Some("plain"), Algorithm::PS256).is_ok());
        assert_eq!(
            set.select(Some("plain"), Algorithm::ES256).unwrap_err(),
            Lookup::Mismatch
        );
        assert_eq!(
            set.select(Some("plain"), Algorithm::HS256).unwrap_err(),
            Lookup::Mismatch
        );
        assert!(set.select(Some("rs256-only"), Algorithm::RS256).is_ok());
        assert_eq!(
            set.select(Some("rs256-only"), Algorithm::PS256)
                .unwrap_err(),
            Lookup::Mismatch
        );
        for kid in ["enc", "oaep", "ops"] {
            assert_eq!(
                set.select(Some(kid), Algorithm::RS256).unwrap_err(),
                Lookup::Mismatch
            );
        }
        assert!(set.select(Some("ec"), Algorithm::ES256).is_ok());
        assert_eq!(
            set.select(Some("ec"), Algorithm::ES384).unwrap_err(),
            Lookup::Mismatch
        );
        assert_eq!(
            set.select(Some("ec"), Algorithm::EdDSA).unwrap_err(),
            Lookup::Mismatch
        );
        assert!(set.select(Some("ed"), Algorithm::EdDSA).is_ok());
        assert_eq!(
            set.select(Some("ed"), Algorithm::RS256).unwrap_err(),
            Lookup::Mismatch
        );
        assert_eq!(
            set.select(Some("nope"), Algorithm::RS256).unwrap_err(),
            Lookup::Unknown
        );
        assert_eq!(
            set.select(None, Algorithm::RS256).unwrap_err(),
            Lookup::MissingKid
        );
    }

    #[test]
    fn unusable_keys_are_skipped_and_the_rest_kept() {
        let set = parse(serde_json::json!([
            rsa_jwk("short", 1024, serde_json::json!({})),
            {"kty": "oct", "kid": "hmac", "k": b64(b"secret")},
            {"kty": "EC", "crv": "P-256", "kid": "badlen", "x": b64(&[1; 31]), "y": b64(&[2; 32])},
            {"kty": "EC", "crv": "secp256k1", "kid": "k1", "x": b64(&[1; 32]), "y": b64(&[2; 32])},
            {"kty": "RSA", "kid": "no-n", "e": "AQAB"},
            {"kty": 7},
            rsa_jwk("good", 2048, serde_json::json!({})),
        ]));
        assert_eq!(set.len(), 1);
        assert!(set.select(Some("good"), Algorithm::RS256).is_ok());
        // A lone key may be used by a token that names none.
        assert!(set.select(None, Algorithm::RS256).is_ok());
        assert_eq!(
            set.select(Some("hmac"), Algorithm::HS256).unwrap_err(),
            Lookup::Unknown
        );
    }

    #[test]
    fn duplicate_kids_pick_the_fitting_key() {
        let set = parse(serde_json::json!([
            rsa_jwk("k", 2048, serde_json::json!({"use": "enc"})),
            rsa_jwk("k", 2048, serde_json::json!({"use": "sig"})),
        ]));
        assert!(set.select(Some("k"), Algorithm::RS256).is_ok());
    }

    #[test]
    fn modulus_bits_ignore_leading_zeros() {
        assert_eq!(modulus_bits(&[0, 0, 0x80, 0]), 16);
        assert_eq!(modulus_bits(&[0x01]), 1);
        assert_eq!(modulus_bits(&[0, 0]), 0);
    }

    #[test]
    fn a_set_that_is_not_json_is_an_error() {
        assert!(KeySet::parse(b"<html>", 1).is_err());
        assert!(KeySet::parse(b"{\"keys\": 5}", 1).is_err());
    }
}
