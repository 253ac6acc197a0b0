//! Glue between the configuration file and the identity layer: `[[issuers]]` entries become the
//! verifier's [`IssuerSettings`].

use thiserror::Error;

use crate::{
    config::{GroupClaimFormat, IssuerConfig},
    identity::{Algorithm, ClaimFormat, ClaimSource, IssuerSettings},
};

/// Why an `[[issuers]]` entry could not become verifier settings.
#[derive(Debug, Error)]
pub enum WiringError {
    /// An algorithm name the identity layer does not know (config validation should have refused
    /// it already).
    #[error("issuer {issuer:?}: unknown algorithm {algorithm:?}")]
    Algorithm {
        /// The issuer.
        issuer: String,
        /// The name as configured.
        algorithm: String,
    },
}

/// The verifier settings for one configured issuer.
///
/// `allow_http` has no counterpart: the identity layer already accepts plain http for loopback
/// issuers, the only ones the configuration lets through with it, so `allow_insecure_http` stays
/// false and a non-loopback http issuer can never slip in here.
pub fn issuer_settings(c: &IssuerConfig) -> Result<IssuerSettings, WiringError> {
    let algorithms = c
        .algorithms
        .iter()
        .map(|a| {
            a.parse::<Algorithm>().map_err(|_| WiringError::Algorithm {
                issuer: c.issuer.clone(),
                algorithm: a.clone(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut s = IssuerSettings::new(c.issuer.clone(), c.audiences.iter().cloned());
    s.algorithms = algorithms;
    s.leeway = c.leeway;
    s.require_typ_at_jwt = c.require_typ_at_jwt;
    s.max_token_bytes = c.max_token_bytes;
    s.user_claim = c.user_claim.clone();
    s.group_claims = c
        .group_claims
        .iter()
        .map(|g| ClaimSource {
            claim: g.path.clone(),
            format: match g.format {
                GroupClaimFormat::Array => ClaimFormat::Array,
                GroupClaimFormat::SpaceSeparated => ClaimFormat::SpaceSeparated,
            },
        })
        .collect();
    s.ca_file = c.ca_file.clone();
    s.allow_insecure_http = false;
    s.jwks_refresh_interval = c.jwks_refresh;
    Ok(s)
}

/// The verifier settings for every configured issuer.
pub fn all_issuer_settings(issuers: &[IssuerConfig]) -> Result<Vec<IssuerSettings>, WiringError> {
    issuers.iter().map(issuer_settings).collect()
}

/// The User-ID pusher's settings for `[userid]` (`None` without it): reads every firewall's API
/// key and CA file, so that a missing or unreadable one stops start-up (exit 2).
pub fn userid_settings(
    config: Option<&crate::config::UserIdConfig>,
) -> Result<Option<crate::userid::Settings>, crate::userid::UserIdError> {
    config.map(crate::userid::Settings::from_config).transpose()
}

/// What the policy sees of a verified token.
pub fn identity_of(token: &crate::identity::VerifiedToken) -> crate::policy::Identity {
    crate::policy::Identity {
        issuer: token.issuer.to_string(),
        user: token.user.clone(),
        groups: token.groups.clone(),
        scopes: token.scopes.clone(),
        claims: token.claims.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::GroupClaim;

    fn config() -> IssuerConfig {
        IssuerConfig {
            issuer: "https://idp.example/realms/corp".into(),
            audiences: vec!["idgate".into(), "api".into()],
            algorithms: vec![
                "RS256".into(),
                "ES256".into(),
                "EdDSA".into(),
                "PS384".into(),
            ],
            leeway: Duration::from_secs(30),
            require_typ_at_jwt: true,
            max_token_bytes: 4096,
            user_claim: "preferred_username".into(),
            group_claims: vec![
                GroupClaim {
                    path: "realm_access.roles".into(),
                    format: GroupClaimFormat::Array,
                },
                GroupClaim {
                    path: "scope".into(),
                    format: GroupClaimFormat::SpaceSeparated,
                },
            ],
            jwks_refresh: Duration::from_secs(600),
            ca_file: Some("/etc/idgate/ca.pem".into()),
            allow_http: false,
        }
    }

    #[test]
    fn every_field_maps_one_to_one() {
        let s = issuer_settings(&config()).unwrap();
        assert_eq!(s.issuer, "https://idp.example/realms/corp");
        assert_eq!(s.audiences, ["idgate", "api"]);
        assert_eq!(
            s.algorithms,
            [
                Algorithm::RS256,
                Algorithm::ES256,
                Algorithm::EdDSA,
                Algorithm::PS384
            ]
        );
        assert_eq!(s.leeway, Duration::from_secs(30));
        assert!(s.require_typ_at_jwt);
        assert_eq!(s.max_token_bytes, 4096);
        assert_eq!(s.user_claim, "preferred_username");
        assert_eq!(
            s.group_claims,
            [
                ClaimSource::array("realm_access.roles"),
                ClaimSource::space_separated("scope")
            ]
        );
        assert_eq!(s.ca_file.as_deref(), Some("/etc/idgate/ca.pem".as_ref()));
        assert!(!s.allow_insecure_http);
        assert_eq!(s.jwks_refresh_interval, Duration::from_secs(600));
        s.validate().unwrap();
    }

    #[test]
    fn every_configurable_algorithm_parses() {
        let mut c = config();
        c.algorithms = crate::config::ALGORITHMS
            .iter()
            .map(|a| (*a).to_owned())
            .collect();
        assert_eq!(
            issuer_settings(&c).unwrap().algorithms.len(),
            crate::config::ALGORITHMS.len()
        );
        c.algorithms = vec!["XX999".into()];
        assert!(issuer_settings(&c).is_err());
    }

    #[test]
    fn loopback_http_issuer_stays_strict() {
        let mut c = config();
        c.issuer = "http://127.0.0.1:8080/realms/test".into();
        c.allow_http = true;
        let s = issuer_settings(&c).unwrap();
        assert!(!s.allow_insecure_http);
        s.validate().unwrap();
    }
}
