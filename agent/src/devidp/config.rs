//! The dev IdP's clients file (TOML, unknown keys refused); `agent/devidp.example.toml` shows
//! every key and is also the built-in default.

use std::{fmt, path::Path, time::Duration};

use serde::Deserialize;

use super::DevIdpError;
use crate::config::parse_duration;

/// The example clients file, served when no `--config` is given.
pub const EXAMPLE: &str = include_str!("../../devidp.example.toml");

/// Token lifetime when a client names none.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);
/// Longest token lifetime accepted: a dev token living longer is a mistake waiting to happen.
const MAX_LIFETIME: Duration = Duration::from_secs(86_400);

/// The clients the dev IdP knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevIdpConfig {
    /// Every client, in file order.
    pub clients: Vec<Client>,
}

/// One client, allowed the client credentials grant.
#[derive(Clone, PartialEq, Eq)]
pub struct Client {
    /// The client id (`client_id` claim).
    pub client_id: String,
    /// The shared secret the client authenticates with.
    pub client_secret: String,
    /// The `sub` of its tokens.
    pub subject: String,
    /// The `groups` claim of its tokens.
    pub groups: Vec<String>,
    /// Scopes it may ask for; asking for none grants all of them.
    pub scopes: Vec<String>,
    /// The `aud` of its tokens.
    pub audiences: Vec<String>,
    /// How long its tokens are valid.
    pub token_lifetime: Duration,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The secret stays out of logs and panic messages.
        f.debug_struct("Client")
            .field("client_id", &self.client_id)
            .field("subject", &self.subject)
            .field("groups", &self.groups)
            .field("scopes", &self.scopes)
            .field("audiences", &self.audiences)
            .field("token_lifetime", &self.token_lifetime)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    clients: Vec<RawClient>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClient {
    client_id: String,
    client_secret: String,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    scopes: Vec<String>,
    audience: OneOrMany,
    #[serde(default)]
    token_lifetime: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl DevIdpConfig {
    /// Reads and validates a clients file.
    pub fn load(path: &Path) -> Result<Self, DevIdpError> {
        let text = std::fs::read_to_string(path).map_err(|source| DevIdpError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|message| DevIdpError::Config {
            origin: path.display().to_string(),
            message,
        })
    }

    /// The clients of the built-in example.
    pub fn example() -> Self {
        Self::parse(EXAMPLE).expect("the built-in example is valid (a unit test checks it)")
    }

    /// Parses and validates a clients file's text; the error lists every problem found.
    pub fn parse(text: &str) -> Result<Self, String> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut problems = Vec::new();
        let mut clients: Vec<Client> = Vec::with_capacity(raw.clients.len());
        if raw.clients.is_empty() {
            problems.push("no [[clients]] are configured".to_owned());
        }
        for (i, c) in raw.clients.into_iter().enumerate() {
            let mut problem = |what: String| problems.push(format!("clients[{i}]: {what}"));
            if c.client_id.is_empty() || c.client_id.chars().any(char::is_control) {
                problem("client_id must be non-empty, without control characters".into());
            } else if clients.iter().any(|o| o.client_id == c.client_id) {
                problem(format!("client_id {:?} is used twice", c.client_id));
            }
            if c.client_secret.is_empty() {
                problem("client_secret must not be empty".into());
            }
            if c.subject.as_deref().is_some_and(str::is_empty) {
                problem("subject must not be empty".into());
            }
            if c.groups.iter().any(String::is_empty) {
                problem("group names must not be empty".into());
            }
            // RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E ).
            let scope_char = |ch: char| matches!(ch, '!' | '#'..='[' | ']'..='~');
            if let Some(bad) = c
                .scopes
                .iter()
                .find(|s| s.is_empty() || !s.chars().all(scope_char))
            {
                problem(format!("scope {bad:?} is not a valid scope token"));
            }
            let audiences = match c.audience {
                OneOrMany::One(a) => vec![a],
                OneOrMany::Many(a) => a,
            };
            if audiences.is_empty() || audiences.iter().any(String::is_empty) {
                problem("audience must be a non-empty string or list of them".into());
            }
            let token_lifetime = match c.token_lifetime.as_deref().map(parse_duration) {
                None => DEFAULT_LIFETIME,
                Some(Ok(d)) if d >= Duration::from_secs(1) && d <= MAX_LIFETIME => d,
                Some(Ok(_)) => {
                    problem("token_lifetime must be from 1s to 1d".into());
                    DEFAULT_LIFETIME
                }
                Some(Err(e)) => {
                    problem(format!("token_lifetime: {e}"));
                    DEFAULT_LIFETIME
                }
            };
            let mut scopes = Vec::with_capacity(c.scopes.len());
            for s in c.scopes {
                if !scopes.contains(&s) {
                    scopes.push(s);
                }
            }
            clients.push(Client {
                subject: c.subject.unwrap_or_else(|| c.client_id.clone()),
                client_id: c.client_id,
                client_secret: c.client_secret,
                groups: c.groups,
                scopes,
                audiences,
                token_lifetime,
            });
        }
        if problems.is_empty() {
            Ok(Self { clients })
        } else {
            Err(problems.join("\n"))
        }
    }

    /// The longest token lifetime of any client.
    pub fn longest_lifetime(&self) -> Duration {
        self.clients
            .iter()
            .map(|c| c.token_lifetime)
            .max()
            .unwrap_or(DEFAULT_LIFETIME)
    }

    /// The client with this id.
    pub fn client(&self, client_id: &str) -> Option<&Client> {
        self.clients.iter().find(|c| c.client_id == client_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_parses_with_defaults_filled_in() {
        let config = DevIdpConfig::parse(EXAMPLE).unwrap();
        let alice = config.client("alice").unwrap();
        assert_eq!(alice.subject, "alice");
        assert_eq!(alice.groups, ["engineering", "ssh-users"]);
        assert_eq!(alice.scopes, ["ssh", "metrics"]);
        assert_eq!(alice.audiences, ["api://idgate"]);
        assert_eq!(alice.token_lifetime, Duration::from_secs(900));
        let bob = config.client("bob").unwrap();
        assert_eq!(bob.subject, "bob", "subject defaults to the client id");
        assert!(bob.scopes.is_empty());
        assert_eq!(bob.token_lifetime, Duration::from_secs(120));
        assert_eq!(config.longest_lifetime(), Duration::from_secs(900));
        assert_eq!(DevIdpConfig::example(), config);
        assert!(
            !format!("{alice:?}").contains("alice-dev-secret"),
            "Debug shows no secret"
        );
    }

    #[test]
    fn audiences_may_be_a_list_and_lifetime_defaults() {
        let config = DevIdpConfig::parse(
            r#"
            [[clients]]
            client_id = "svc"
            client_secret = "s"
            audience = ["api://idgate", "other"]
            "#,
        )
        .unwrap();
        assert_eq!(config.clients[0].audiences, ["api://idgate", "other"]);
        assert_eq!(config.clients[0].token_lifetime, DEFAULT_LIFETIME);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let top = DevIdpConfig::parse("issuer = \"x\"\n").unwrap_err();
        assert!(top.contains("unknown field `issuer`"), "{top}");
        let inner = DevIdpConfig::parse(
            r#"
            [[clients]]
            client_id = "a"
            client_secret = "s"
            audience = "x"
            group = ["typo"]
            "#,
        )
        .unwrap_err();
        assert!(inner.contains("unknown field `group`"), "{inner}");
        assert!(inner.contains("line 6"), "the error says where: {inner}");
    }

    #[test]
    fn every_invalid_value_is_reported_at_once() {
        let e = DevIdpConfig::parse(
            r#"
            [[clients]]
            client_id = "a"
            client_secret = ""
            audience = []
            scopes = ["has space"]
            token_lifetime = "2d"

            [[clients]]
            client_id = "a"
            client_secret = "s"
            audience = "x"
            token_lifetime = "300"
            "#,
        )
        .unwrap_err();
        for expected in [
            "clients[0]: client_secret must not be empty",
            "clients[0]: audience must be",
            "clients[0]: scope \"has space\"",
            "clients[0]: token_lifetime must be from 1s to 1d",
            "clients[1]: client_id \"a\" is used twice",
            "clients[1]: token_lifetime: expected a duration",
        ] {
            assert!(e.contains(expected), "missing {expected:?} in:\n{e}");
        }
        assert!(
            DevIdpConfig::parse("")
                .unwrap_err()
                .contains("no [[clients]]")
        );
    }
}
