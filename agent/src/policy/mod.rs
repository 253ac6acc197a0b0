//! The policy engine: PAN-OS-style security rules, evaluated in order, first match wins.
//!
//! A rule matches traffic to one of its services from one of its source CIDRs (none listed: any
//! address) whose identity satisfies one of its source matchers (and its `issuer`, if set).
//! Rules come in two kinds:
//!
//! - **Static rules** have no identity condition (`sources` absent or `["any"]`, no `issuer`).
//!   They also match traffic without any token, so they become kernel CIDR entries where that
//!   preserves first-match order (see [`Policy::cidr_rules`] for the exact rule).
//! - **Identity rules** need a verified identity. They are evaluated when a token is presented
//!   ([`Policy::evaluate`]); an allow becomes data-plane sessions for the client's address.
//!
//! Rule ids are the rule's position in the file plus one, disabled rules included, so that
//! toggling `enabled` does not renumber the rules reported in data-plane events.

mod compile;
mod explain;
pub mod panos;
#[cfg(test)]
mod tests;

use std::{fmt, net::IpAddr, str::FromStr, time::Duration};

use ipnet::IpNet;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

use crate::{
    config::{Config, ServiceConfig},
    dataplane::{CidrRule, ServiceAction, ServiceId},
};

pub(crate) use compile::{Severity, Subject};
pub use explain::{Explanation, RuleResult, RuleTrace, ServiceExplanation};

/// What a rule (or the default) does with the traffic it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Let it through: a session (identity rules) or a kernel CIDR allow entry (static rules).
    Allow,
    /// Refuse it silently.
    Drop,
    /// Refuse it; TCP clients get a RST where the data plane can send one.
    Reset,
}

impl FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "allow" => Ok(Action::Allow),
            "drop" => Ok(Action::Drop),
            "reset" => Ok(Action::Reset),
            other => Err(format!(
                "unknown action {other:?}: expected \"allow\", \"drop\" or \"reset\""
            )),
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "allow",
            Action::Drop => "drop",
            Action::Reset => "reset",
        })
    }
}

/// One condition on who is asking, as written in a rule's `sources`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SourceMatcher {
    /// `any`: no identity condition.
    Any,
    /// `known-user`: any verified identity.
    KnownUser,
    /// `user:<name>`: the identity's user is exactly this.
    User(String),
    /// `group:<name>`: the identity has this group.
    Group(String),
    /// `scope:<name>`: the token carries this scope.
    Scope(String),
    /// `claim:<dotted.path>=<value>`: the claim at the path equals the value or, for an array,
    /// contains it.
    Claim {
        /// Dotted path into the token's claims (`realm_access.roles`).
        path: String,
        /// The value to find there.
        value: String,
    },
}

impl FromStr for SourceMatcher {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let named = |kind: &str, name: &str| {
            if name.is_empty() {
                Err(format!("`{kind}:` needs a name after the colon"))
            } else {
                Ok(name.to_owned())
            }
        };
        match s {
            "any" => return Ok(SourceMatcher::Any),
            "known-user" => return Ok(SourceMatcher::KnownUser),
            _ => {}
        }
        match s.split_once(':') {
            Some(("user", n)) => Ok(SourceMatcher::User(named("user", n)?)),
            Some(("group", n)) => Ok(SourceMatcher::Group(named("group", n)?)),
            Some(("scope", n)) => Ok(SourceMatcher::Scope(named("scope", n)?)),
            Some(("claim", rest)) => {
                let Some((path, value)) = rest.split_once('=') else {
                    return Err(format!(
                        "{s:?}: expected claim:<dotted.path>=<value>, e.g. claim:realm_access.roles=admin"
                    ));
                };
                check_claim_path(path).map_err(|e| format!("{s:?}: {e}"))?;
                Ok(SourceMatcher::Claim {
                    path: path.to_owned(),
                    value: value.to_owned(),
                })
            }
            _ => Err(format!(
                "unknown source {s:?}: expected any, known-user, user:<name>, group:<name>, \
                 scope:<name> or claim:<dotted.path>=<value>"
            )),
        }
    }
}

impl fmt::Display for SourceMatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceMatcher::Any => f.write_str("any"),
            SourceMatcher::KnownUser => f.write_str("known-user"),
            SourceMatcher::User(n) => write!(f, "user:{n}"),
            SourceMatcher::Group(n) => write!(f, "group:{n}"),
            SourceMatcher::Scope(n) => write!(f, "scope:{n}"),
            SourceMatcher::Claim { path, value } => write!(f, "claim:{path}={value}"),
        }
    }
}

impl SourceMatcher {
    fn matches(&self, id: &Identity) -> bool {
        match self {
            SourceMatcher::Any | SourceMatcher::KnownUser => true,
            SourceMatcher::User(u) => id.user == *u,
            SourceMatcher::Group(g) => id.groups.iter().any(|x| x == g),
            SourceMatcher::Scope(s) => id.scopes.iter().any(|x| x == s),
            SourceMatcher::Claim { path, value } => {
                claim_at(&id.claims, path).is_some_and(|v| claim_has(v, value))
            }
        }
    }
}

/// Checks a dotted claim path: non-empty segments separated by single dots.
pub(crate) fn check_claim_path(path: &str) -> Result<(), String> {
    if path.is_empty() || path.split('.').any(str::is_empty) {
        return Err(format!(
            "claim path {path:?} must be non-empty names separated by single dots"
        ));
    }
    Ok(())
}

/// The claim at a dotted path. At each level the longest run of segments that names a key wins,
/// so claim names that themselves contain dots (`https://example.com/roles`) can be addressed.
pub fn claim_at<'v>(claims: &'v Value, path: &str) -> Option<&'v Value> {
    let obj = claims.as_object()?;
    if let Some(v) = obj.get(path) {
        return Some(v);
    }
    let dots: Vec<usize> = path.match_indices('.').map(|(i, _)| i).collect();
    dots.iter()
        .rev()
        .find_map(|&i| claim_at(obj.get(&path[..i])?, &path[i + 1..]))
}

/// Whether a claim value is, or (for an array) contains, `want`. Numbers and booleans compare by
/// their JSON text, so `claim:level=3` matches `"level": 3`.
fn claim_has(v: &Value, want: &str) -> bool {
    let scalar = |v: &Value| match v {
        Value::String(s) => s == want,
        Value::Number(n) => n.to_string() == want,
        Value::Bool(b) => b.to_string() == want,
        _ => false,
    };
    match v {
        Value::Array(items) => items.iter().any(scalar),
        other => scalar(other),
    }
}

/// Which services a rule applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceSelector {
    /// `["any"]`: every configured service.
    Any,
    /// These services, by name.
    Named(Vec<String>),
}

/// A policy rule as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Unique name.
    pub name: String,
    /// Disabled rules are skipped (and keep their id).
    pub enabled: bool,
    /// Free text for operators.
    pub description: Option<String>,
    /// Only identities from this issuer (an `[[issuers]]` URL) match.
    pub issuer: Option<String>,
    /// Who matches: any one of these (`[Any]` when absent).
    pub sources: Vec<SourceMatcher>,
    /// Source networks, any one of which must contain the client address (empty: any address).
    pub source_cidrs: Vec<IpNet>,
    /// Services the rule applies to.
    pub services: ServiceSelector,
    /// What happens to matched traffic.
    pub action: Action,
    /// Upper bound on sessions this rule opens (itself capped by the global bound).
    pub max_session_lifetime: Option<Duration>,
    /// How long a session may sit unused (enforced by the agent, not the kernel).
    pub idle_timeout: Option<Duration>,
    /// Whether matches are logged.
    pub log: bool,
}

impl Rule {
    /// Whether the rule has no identity condition, so it also matches traffic without a token.
    pub fn is_static(&self) -> bool {
        self.issuer.is_none() && self.sources.iter().all(|s| *s == SourceMatcher::Any)
    }

    /// The source networks, with "any" spelled out as both families' default routes.
    fn effective_cidrs(&self) -> Vec<IpNet> {
        if self.source_cidrs.is_empty() {
            vec![
                IpNet::V4(ipnet::Ipv4Net::default()),
                IpNet::V6(ipnet::Ipv6Net::default()),
            ]
        } else {
            self.source_cidrs.clone()
        }
    }
}

/// A verified identity, as the policy sees it (the token layer maps its verified token into
/// this).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    /// The token's `iss`, exactly as in `[[issuers]]`.
    pub issuer: String,
    /// The user name (the issuer's `user_claim`).
    pub user: String,
    /// Groups (from the issuer's `group_claims`).
    #[serde(default)]
    pub groups: Vec<String>,
    /// Scopes the token carries.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// All claims of the token, for `claim:` matchers.
    #[serde(default)]
    pub claims: Value,
}

/// The rule that decided, as reported to the data plane and in logs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MatchedRule {
    /// Stable id (position in the file plus one).
    pub id: u32,
    /// The rule's name.
    pub name: String,
}

/// The decision for one service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceDecision {
    /// The service's data-plane id.
    #[serde(serialize_with = "ser_service_id")]
    pub service_id: ServiceId,
    /// The service's name.
    pub service: String,
    /// What to do: the matched rule's action, or the policy default.
    pub action: Action,
    /// The rule that matched; `None` when the default decided.
    pub rule: Option<MatchedRule>,
    /// Whether the agent should write a session: an identity rule allowed. (A static allow rule's
    /// traffic already passes by its kernel CIDR entry.)
    pub needs_session: bool,
    /// With a session: the longest it may last (rule bound capped by the global bound); it also
    /// ends when the token expires.
    #[serde(serialize_with = "ser_secs")]
    pub max_session_lifetime: Option<Duration>,
    /// With a session: how long it may sit idle, if the rule says.
    #[serde(serialize_with = "ser_secs")]
    pub idle_timeout: Option<Duration>,
    /// Whether this decision should be logged.
    pub log: bool,
}

impl ServiceDecision {
    /// The rule id for the data plane (0 when the default decided).
    pub fn rule_id(&self) -> u32 {
        self.rule.as_ref().map_or(0, |r| r.id)
    }
}

fn ser_service_id<S: Serializer>(id: &ServiceId, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u32(id.get())
}

fn ser_secs<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&d.as_secs()),
        None => s.serialize_none(),
    }
}

/// A configured service, with its data-plane id.
#[derive(Clone, Debug)]
struct PolicyService {
    id: ServiceId,
    config: ServiceConfig,
}

/// A rule with its id and its services resolved to ids.
#[derive(Clone, Debug)]
struct PolicyRule {
    id: u32,
    rule: Rule,
    services: Vec<ServiceId>,
}

impl PolicyRule {
    fn applies_to(&self, service: ServiceId) -> bool {
        self.services.contains(&service)
    }
}

/// Why a rule did or did not match, as computed once for both evaluation and explanation.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    Disabled,
    ServiceNotInRule,
    SourceCidrMismatch,
    NoIdentity,
    IssuerMismatch,
    NoMatchingSource,
    /// Matched, by this source matcher.
    Matched(SourceMatcher),
}

/// The compiled policy: services with ids, rules with ids, the default action.
#[derive(Clone, Debug)]
pub struct Policy {
    services: Vec<PolicyService>,
    rules: Vec<PolicyRule>,
    default: Action,
    max_session_lifetime: Duration,
}

impl Policy {
    /// The policy of a validated configuration.
    pub fn new(config: &Config) -> Policy {
        Policy::build(
            &config.services,
            config.policy.rules.iter().enumerate(),
            config.policy.default,
            config.dataplane.max_session_lifetime,
        )
    }

    /// Builds a policy from services (ids 1.. in order) and `(file index, rule)` pairs; service
    /// names that do not resolve are skipped (validation reports them).
    pub(crate) fn build<'r>(
        services: &[ServiceConfig],
        rules: impl IntoIterator<Item = (usize, &'r Rule)>,
        default: Action,
        max_session_lifetime: Duration,
    ) -> Policy {
        let services: Vec<PolicyService> = services
            .iter()
            .zip(1u32..)
            .filter_map(|(s, id)| {
                Some(PolicyService {
                    id: ServiceId::new(id).ok()?,
                    config: s.clone(),
                })
            })
            .collect();
        let rules = rules
            .into_iter()
            .map(|(index, rule)| PolicyRule {
                id: u32::try_from(index + 1).unwrap_or(u32::MAX),
                services: match &rule.services {
                    ServiceSelector::Any => services.iter().map(|s| s.id).collect(),
                    ServiceSelector::Named(names) => services
                        .iter()
                        .filter(|s| names.contains(&s.config.name))
                        .map(|s| s.id)
                        .collect(),
                },
                rule: rule.clone(),
            })
            .collect();
        Policy {
            services,
            rules,
            default,
            max_session_lifetime,
        }
    }

    /// The data-plane services, ids 1.. in file order.
    pub fn dataplane_services(&self) -> Vec<crate::dataplane::Service> {
        self.services
            .iter()
            .map(|s| crate::dataplane::Service {
                id: s.id,
                protocol: s.config.protocol,
                port: s.config.port,
                action: s.config.action,
            })
            .collect()
    }

    /// The kernel CIDR entries compiled from static rules.
    ///
    /// The kernel decides a packet to a protected service in a fixed order: a CIDR **deny** entry
    /// drops, else a CIDR **allow** entry passes, else a session passes, else the service's
    /// action. Policy order is first match wins. A static rule's entry for (service, network) is
    /// therefore only written when the kernel's order gives the same answer as the policy's for
    /// every address in that network and every identity (or none):
    ///
    /// - **allow** → a CIDR allow entry, unless an earlier rule for the same service and an
    ///   overlapping network could refuse that traffic where the kernel cannot: an identity rule
    ///   with drop/reset, or a static drop/reset that did not become a deny entry itself. That is
    ///   a configuration **error** (the kernel would let through what the policy refuses); the
    ///   fix is to move the allow rule above, or narrow its networks. An earlier deny entry is
    ///   fine, as the kernel checks denies first.
    /// - **drop/reset** → a CIDR deny entry, unless an earlier rule for the same service and an
    ///   overlapping network can allow (an identity or static allow): the kernel's deny would
    ///   override it. Such a rule is left to token time (a **warning**): tokens from those
    ///   sources get the rule's refusal, and traffic without a session gets the service's action.
    ///   Deny entries drop silently, so a compiled `reset` rule warns that it is a drop.
    /// - An entry whose network lies within a network of an earlier static rule for the same
    ///   service is never reached and is not written.
    ///
    /// Identity rules never become CIDR entries. Evaluating a token ([`Policy::evaluate`])
    /// includes static rules, so both paths agree.
    pub fn cidr_rules(&self) -> Vec<CidrRule> {
        self.analyse().entries
    }

    /// Compiles static rules and finds rules and services that cannot work as written.
    pub(crate) fn analyse(&self) -> compile::Analysis {
        compile::analyse(self)
    }

    /// The decision for every service, for a verified identity at `source`.
    pub fn evaluate(&self, identity: &Identity, source: IpAddr) -> Vec<ServiceDecision> {
        self.decide(Some(identity), source)
    }

    /// The decision for every service, for traffic from `source` without a token.
    pub fn evaluate_unauthenticated(&self, source: IpAddr) -> Vec<ServiceDecision> {
        self.decide(None, source)
    }

    fn decide(&self, identity: Option<&Identity>, source: IpAddr) -> Vec<ServiceDecision> {
        let source = source.to_canonical();
        self.services
            .iter()
            .map(|s| {
                let hit = self
                    .rules
                    .iter()
                    .find(|r| matches!(check(r, s.id, identity, source), Outcome::Matched(_)));
                self.decision(s, hit)
            })
            .collect()
    }

    fn decision(&self, s: &PolicyService, hit: Option<&PolicyRule>) -> ServiceDecision {
        let Some(r) = hit else {
            return ServiceDecision {
                service_id: s.id,
                service: s.config.name.clone(),
                action: self.default,
                rule: None,
                needs_session: false,
                max_session_lifetime: None,
                idle_timeout: None,
                log: true,
            };
        };
        let session = r.rule.action == Action::Allow && !r.rule.is_static();
        let lifetime = r
            .rule
            .max_session_lifetime
            .unwrap_or(self.max_session_lifetime)
            .min(self.max_session_lifetime);
        ServiceDecision {
            service_id: s.id,
            service: s.config.name.clone(),
            action: r.rule.action,
            rule: Some(MatchedRule {
                id: r.id,
                name: r.rule.name.clone(),
            }),
            needs_session: session,
            max_session_lifetime: session.then_some(lifetime),
            idle_timeout: if session { r.rule.idle_timeout } else { None },
            log: r.rule.log,
        }
    }

    /// Per service, every rule in order and why it did or did not match, for an identity.
    pub fn explain(&self, identity: &Identity, source: IpAddr) -> Explanation {
        explain::explain(self, Some(identity), source)
    }

    /// Per service, every rule in order and why it did or did not match, without a token.
    pub fn explain_unauthenticated(&self, source: IpAddr) -> Explanation {
        explain::explain(self, None, source)
    }

    /// The rule with this id.
    pub fn rule(&self, id: u32) -> Option<&Rule> {
        self.rules.iter().find(|r| r.id == id).map(|r| &r.rule)
    }

    /// The action when no rule matches.
    pub fn default_action(&self) -> Action {
        self.default
    }

    /// The global bound on session lifetime.
    pub fn max_session_lifetime(&self) -> Duration {
        self.max_session_lifetime
    }
}

/// Whether `rule` matches `service` for `identity` at `source` (canonical), and if not, the first
/// condition that failed, checked in the order an operator reads a rule.
fn check(
    rule: &PolicyRule,
    service: ServiceId,
    identity: Option<&Identity>,
    source: IpAddr,
) -> Outcome {
    let r = &rule.rule;
    if !r.enabled {
        return Outcome::Disabled;
    }
    if !rule.applies_to(service) {
        return Outcome::ServiceNotInRule;
    }
    if !r.source_cidrs.is_empty() && !r.source_cidrs.iter().any(|n| n.contains(&source)) {
        return Outcome::SourceCidrMismatch;
    }
    if r.is_static() {
        return Outcome::Matched(SourceMatcher::Any);
    }
    let Some(id) = identity else {
        return Outcome::NoIdentity;
    };
    if r.issuer.as_ref().is_some_and(|i| *i != id.issuer) {
        return Outcome::IssuerMismatch;
    }
    match r.sources.iter().find(|m| m.matches(id)) {
        Some(m) => Outcome::Matched(m.clone()),
        None => Outcome::NoMatchingSource,
    }
}

/// Whether the service is refused with a RST or silently, as configured.
fn service_action_name(a: ServiceAction) -> &'static str {
    match a {
        ServiceAction::Drop => "drop",
        ServiceAction::Reset => "reset",
    }
}
