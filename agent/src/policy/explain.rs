//! `idgate policy explain`: every rule, per service, with why it did or did not match.

use std::{fmt, net::IpAddr};

use serde::Serialize;

use super::{Identity, Outcome, Policy, ServiceDecision, check, service_action_name};
use crate::config::format_duration;

/// Why one rule did or did not decide, for one service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RuleResult {
    /// The rule matched and decided.
    Matched,
    /// The rule is disabled.
    Disabled,
    /// The rule does not list this service.
    ServiceNotInRule,
    /// The source address is in none of the rule's networks.
    SourceCidrMismatch,
    /// The rule needs an identity and there is none.
    NoIdentity,
    /// The identity comes from another issuer than the rule's.
    IssuerMismatch,
    /// None of the rule's source matchers fits the identity.
    NoMatchingSource,
    /// An earlier rule already decided.
    NotEvaluated,
}

impl fmt::Display for RuleResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RuleResult::Matched => "matched",
            RuleResult::Disabled => "disabled",
            RuleResult::ServiceNotInRule => "service not in rule",
            RuleResult::SourceCidrMismatch => "source CIDR mismatch",
            RuleResult::NoIdentity => "no identity",
            RuleResult::IssuerMismatch => "issuer mismatch",
            RuleResult::NoMatchingSource => "no matching source",
            RuleResult::NotEvaluated => "not evaluated",
        })
    }
}

/// One rule's line in an explanation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RuleTrace {
    /// The rule id.
    pub id: u32,
    /// The rule name.
    pub name: String,
    /// What happened.
    pub result: RuleResult,
    /// The specifics (which matcher matched, which networks were tried, ...).
    pub detail: String,
}

/// The explanation for one service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceExplanation {
    /// Protocol (`tcp`/`udp`).
    pub protocol: String,
    /// Port.
    pub port: u16,
    /// What the kernel does with traffic nothing lets through (`drop`/`reset`).
    pub service_action: String,
    /// The decision, as [`Policy::evaluate`] gives it.
    pub decision: ServiceDecision,
    /// Every rule, in order.
    pub rules: Vec<RuleTrace>,
}

/// Why the policy decides as it does for an identity (or none) at a source address.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Explanation {
    /// The source address (canonical: IPv4-mapped IPv6 shown as IPv4).
    pub source: IpAddr,
    /// The identity; `None` for traffic without a token.
    pub identity: Option<Identity>,
    /// One entry per configured service, in file order.
    pub services: Vec<ServiceExplanation>,
}

fn list<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

pub(super) fn explain(policy: &Policy, identity: Option<&Identity>, source: IpAddr) -> Explanation {
    let source = source.to_canonical();
    let services = policy
        .services
        .iter()
        .map(|s| {
            let mut decided = None;
            let rules = policy
                .rules
                .iter()
                .map(|r| {
                    let (result, detail) = if decided.is_some() {
                        (
                            RuleResult::NotEvaluated,
                            "an earlier rule matched".to_owned(),
                        )
                    } else {
                        let outcome = check(r, s.id, identity, source);
                        if matches!(outcome, Outcome::Matched(_)) {
                            decided = Some(r);
                        }
                        describe(r, outcome, identity, source)
                    };
                    RuleTrace {
                        id: r.id,
                        name: r.rule.name.clone(),
                        result,
                        detail,
                    }
                })
                .collect();
            ServiceExplanation {
                protocol: s.config.protocol.to_string(),
                port: s.config.port,
                service_action: service_action_name(s.config.action).to_owned(),
                decision: policy.decision(s, decided),
                rules,
            }
        })
        .collect();
    Explanation {
        source,
        identity: identity.cloned(),
        services,
    }
}

fn describe(
    r: &super::PolicyRule,
    outcome: Outcome,
    identity: Option<&Identity>,
    source: IpAddr,
) -> (RuleResult, String) {
    let rule = &r.rule;
    match outcome {
        Outcome::Disabled => (RuleResult::Disabled, "enabled = false".to_owned()),
        Outcome::ServiceNotInRule => (
            RuleResult::ServiceNotInRule,
            match &rule.services {
                super::ServiceSelector::Any => "services: any".to_owned(),
                super::ServiceSelector::Named(n) => format!("services: {}", n.join(", ")),
            },
        ),
        Outcome::SourceCidrMismatch => (
            RuleResult::SourceCidrMismatch,
            format!("{source} is not in {}", list(&rule.source_cidrs)),
        ),
        Outcome::NoIdentity => (
            RuleResult::NoIdentity,
            format!("needs a verified identity ({})", list(&rule.sources)),
        ),
        Outcome::IssuerMismatch => (
            RuleResult::IssuerMismatch,
            format!(
                "issuer is {}, rule wants {}",
                identity.map_or("none", |i| i.issuer.as_str()),
                rule.issuer.as_deref().unwrap_or("any")
            ),
        ),
        Outcome::NoMatchingSource => (
            RuleResult::NoMatchingSource,
            format!("none of {} matches", list(&rule.sources)),
        ),
        Outcome::Matched(by) => {
            let mut detail = if rule.is_static() {
                "no identity condition".to_owned()
            } else {
                format!("by {by}")
            };
            if !rule.source_cidrs.is_empty() {
                let net = rule.source_cidrs.iter().find(|n| n.contains(&source));
                if let Some(net) = net {
                    detail.push_str(&format!(", source in {net}"));
                }
            }
            detail.push_str(&format!(" → {}", rule.action));
            (RuleResult::Matched, detail)
        }
    }
}

impl fmt::Display for Explanation {
    /// A readable report: who, from where, then per service the decision and a table of rules.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.identity {
            Some(id) => {
                writeln!(
                    f,
                    "user {} (issuer {}) from {}",
                    id.user, id.issuer, self.source
                )?;
                writeln!(f, "  groups: {}", none_if_empty(&id.groups))?;
                writeln!(f, "  scopes: {}", none_if_empty(&id.scopes))?;
            }
            None => writeln!(f, "no token, from {}", self.source)?,
        }
        for s in &self.services {
            let d = &s.decision;
            writeln!(f)?;
            write!(
                f,
                "service {} ({}/{}, unmatched traffic: {}): {} ",
                d.service,
                s.protocol,
                s.port,
                s.service_action,
                d.action.to_string().to_uppercase()
            )?;
            match &d.rule {
                Some(r) => write!(f, "by rule {} `{}`", r.id, r.name)?,
                None => write!(f, "by the default action")?,
            }
            if let Some(l) = d.max_session_lifetime {
                write!(f, ", session at most {}", format_duration(l))?;
            }
            if let Some(i) = d.idle_timeout {
                write!(f, ", idle timeout {}", format_duration(i))?;
            }
            if d.action == super::Action::Allow && !d.needs_session {
                write!(f, " (kernel CIDR allow entry, no session)")?;
            }
            writeln!(f)?;
            let id_w = s
                .rules
                .iter()
                .map(|r| r.id.to_string().len())
                .max()
                .unwrap_or(0)
                .max(2);
            let name_w = s
                .rules
                .iter()
                .map(|r| r.name.len())
                .max()
                .unwrap_or(0)
                .max(4);
            let res_w = s
                .rules
                .iter()
                .map(|r| r.result.to_string().len())
                .max()
                .unwrap_or(0)
                .max(6);
            writeln!(
                f,
                "  {:>id_w$}  {:<name_w$}  {:<res_w$}  why",
                "id", "rule", "result"
            )?;
            for r in &s.rules {
                writeln!(
                    f,
                    "  {:>id_w$}  {:<name_w$}  {:<res_w$}  {}",
                    r.id,
                    r.name,
                    r.result.to_string(),
                    r.detail
                )?;
            }
        }
        Ok(())
    }
}

fn none_if_empty(items: &[String]) -> String {
    if items.is_empty() {
        "(none)".to_owned()
    } else {
        items.join(", ")
    }
}
