//! The dev IdP's signing keys: generated in memory at start (and on rotation), never written
//! anywhere, published as a JWK Set, and used to sign compact JWS tokens.

use std::{
    fmt,
    str::FromStr,
    sync::Arc,
    time::{Duration, Instant},
};

use aws_lc_rs::{
    digest::{SHA256, digest},
    error::Unspecified,
    rand::SystemRandom,
    rsa::{KeySize, PublicKeyComponents},
    signature::{
        ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _,
        RSA_PKCS1_SHA256, RsaKeyPair,
    },
};
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use serde_json::{Value, json};

/// The algorithm the dev IdP signs tokens with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SigningAlg {
    /// ECDSA on P-256 with SHA-256.
    #[default]
    Es256,
    /// Ed25519.
    EdDsa,
    /// RSASSA-PKCS1-v1_5 with SHA-256, 2048-bit keys.
    Rs256,
}

impl SigningAlg {
    /// The JWA name (`ES256`, `EdDSA`, `RS256`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Es256 => "ES256",
            Self::EdDsa => "EdDSA",
            Self::Rs256 => "RS256",
        }
    }

    /// The same algorithm as the verifier names it.
    pub fn algorithm(self) -> jsonwebtoken::Algorithm {
        match self {
            Self::Es256 => jsonwebtoken::Algorithm::ES256,
            Self::EdDsa => jsonwebtoken::Algorithm::EdDSA,
            Self::Rs256 => jsonwebtoken::Algorithm::RS256,
        }
    }
}

impl fmt::Display for SigningAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SigningAlg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Self::Es256, Self::EdDsa, Self::Rs256]
            .into_iter()
            .find(|a| a.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown algorithm {s:?}: expected ES256, EdDSA or RS256"))
    }
}

enum Pair {
    Ec(EcdsaKeyPair),
    Ed(Ed25519KeyPair),
    Rsa(RsaKeyPair),
}

/// One signing key with its key id and public JWK.
pub(crate) struct SigningKey {
    pub(crate) kid: String,
    alg: SigningAlg,
    pair: Pair,
    jwk: Value,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

impl SigningKey {
    /// A fresh key; RSA takes a noticeable moment, so async callers should not run this on a
    /// runtime thread.
    pub(crate) fn generate(alg: SigningAlg) -> Result<Self, Unspecified> {
        let (pair, public) = match alg {
            SigningAlg::Es256 => {
                let k = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING)?;
                // Uncompressed point: 0x04 || x || y.
                let point = k.public_key().as_ref();
                let public = json!({
                    "crv": "P-256", "kty": "EC", "x": b64(&point[1..33]), "y": b64(&point[33..]),
                });
                (Pair::Ec(k), public)
            }
            SigningAlg::EdDsa => {
                let k = Ed25519KeyPair::generate()?;
                let public = json!({"crv": "Ed25519", "kty": "OKP", "x": b64(k.public_key())});
                (Pair::Ed(k), public)
            }
            SigningAlg::Rs256 => {
                let k = RsaKeyPair::generate(KeySize::Rsa2048)?;
                let c = PublicKeyComponents::<Vec<u8>>::from(k.public_key());
                let public = json!({"e": b64(&c.e), "kty": "RSA", "n": b64(&c.n)});
                (Pair::Rsa(k), public)
            }
        };
        // RFC 7638 thumbprint: the required members in lexicographic order, no whitespace, which
        // is how serde_json prints an object built in that order. Stable for the key's lifetime
        // and distinct per key without any counter.
        let kid = b64(digest(&SHA256, public.to_string().as_bytes()));
        let mut jwk = public;
        if let Value::Object(o) = &mut jwk {
            o.insert("kid".into(), kid.clone().into());
            o.insert("alg".into(), alg.name().into());
            o.insert("use".into(), "sig".into());
        }
        Ok(Self {
            kid,
            alg,
            pair,
            jwk,
        })
    }

    /// The public JWK (`kid`, `alg`, `use: sig`); the private key never leaves this struct.
    pub(crate) fn public_jwk(&self) -> &Value {
        &self.jwk
    }

    /// A compact JWS of `claims` with header `{alg, kid, typ: at+jwt}` (RFC 9068 §2.1).
    pub(crate) fn sign_jwt(&self, claims: &Value) -> Result<String, Unspecified> {
        let header = json!({"alg": self.alg.name(), "kid": self.kid, "typ": "at+jwt"});
        let input = format!("{}.{}", b64(header.to_string()), b64(claims.to_string()));
        let rng = SystemRandom::new();
        let signature = match &self.pair {
            Pair::Ec(k) => k.sign(&rng, input.as_bytes())?.as_ref().to_vec(),
            Pair::Ed(k) => k.sign(input.as_bytes()).as_ref().to_vec(),
            Pair::Rsa(k) => {
                let mut sig = vec![0; k.public_modulus_len()];
                k.sign(&RSA_PKCS1_SHA256, &rng, input.as_bytes(), &mut sig)?;
                sig
            }
        };
        Ok(format!("{input}.{}", b64(signature)))
    }
}

/// The active key and the retired ones still published until their grace period ends.
#[derive(Debug)]
pub(crate) struct KeyRing {
    active: Arc<SigningKey>,
    /// Newest first, each with the moment it stops being published.
    retired: Vec<(Arc<SigningKey>, Instant)>,
}

impl KeyRing {
    /// A ring holding one key.
    pub(crate) fn new(key: SigningKey) -> Self {
        Self {
            active: Arc::new(key),
            retired: Vec::new(),
        }
    }

    /// The key new tokens are signed with.
    pub(crate) fn active(&self) -> Arc<SigningKey> {
        self.active.clone()
    }

    /// Makes `key` the active one; the previous key stays published for `grace`, so that
    /// tokens it signed keep verifying until they expire.
    pub(crate) fn rotate(&mut self, key: SigningKey, grace: Duration, now: Instant) {
        let previous = std::mem::replace(&mut self.active, Arc::new(key));
        self.prune(now);
        self.retired.insert(0, (previous, now + grace));
    }

    /// Drops retired keys whose grace period is over.
    pub(crate) fn prune(&mut self, now: Instant) {
        self.retired.retain(|(_, until)| *until > now);
    }

    /// The published keys as of `now`: the active one first, then those still in their grace
    /// period, newest first.
    pub(crate) fn published(&self, now: Instant) -> Vec<Arc<SigningKey>> {
        std::iter::once(self.active.clone())
            .chain(
                self.retired
                    .iter()
                    .filter(|(_, until)| *until > now)
                    .map(|(k, _)| k.clone()),
            )
            .collect()
    }

    /// The JWK Set document as of `now`.
    pub(crate) fn jwks(&self, now: Instant) -> Value {
        let published = self.published(now);
        json!({ "keys": published.iter().map(|k| k.public_jwk()).collect::<Vec<_>>() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algorithm_names_parse_case_insensitively() {
        for alg in [SigningAlg::Es256, SigningAlg::EdDsa, SigningAlg::Rs256] {
            assert_eq!(alg.name().parse::<SigningAlg>(), Ok(alg));
            assert_eq!(alg.name().to_lowercase().parse::<SigningAlg>(), Ok(alg));
        }
        assert!("HS256".parse::<SigningAlg>().is_err());
        assert!("none".parse::<SigningAlg>().is_err());
    }

    #[test]
    fn public_jwks_carry_no_private_members_and_a_thumbprint_kid() {
        for alg in [SigningAlg::Es256, SigningAlg::EdDsa, SigningAlg::Rs256] {
            let key = SigningKey::generate(alg).unwrap();
            let jwk = key.public_jwk().as_object().unwrap();
            for private in ["d", "p", "q", "dp", "dq", "qi"] {
                assert!(!jwk.contains_key(private), "{alg}: {private} published");
            }
            assert_eq!(jwk["kid"], key.kid.as_str());
            assert_eq!(jwk["alg"], alg.name());
            assert_eq!(jwk["use"], "sig");
            // SHA-256 in base64url without padding.
            assert_eq!(key.kid.len(), 43, "{alg}");
            assert_ne!(key.kid, SigningKey::generate(alg).unwrap().kid);
        }
    }

    #[test]
    fn rotation_keeps_retired_keys_for_the_grace_period_only() {
        let now = Instant::now();
        let first = SigningKey::generate(SigningAlg::Es256).unwrap();
        let first_kid = first.kid.clone();
        let mut ring = KeyRing::new(first);
        let second = SigningKey::generate(SigningAlg::Es256).unwrap();
        let second_kid = second.kid.clone();
        ring.rotate(second, Duration::from_secs(10), now);
        assert_eq!(ring.active().kid, second_kid);
        let kids =
            |at| -> Vec<String> { ring.published(at).iter().map(|k| k.kid.clone()).collect() };
        assert_eq!(kids(now), [second_kid.clone(), first_kid]);
        assert_eq!(kids(now + Duration::from_secs(10)), [second_kid]);
    }
}
