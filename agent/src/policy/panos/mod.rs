//! `idgate policy import-panos`: translates the security rules of an exported PAN-OS
//! configuration (a firewall's or Panorama's) into an idgate `[policy]` for this host, with a
//! report of what became of every rule and why.
//!
//! What is taken: rules whose destination includes this host's addresses (all of them) and whose
//! service includes at least one protected service; they keep their order (Panorama: shared and
//! device-group pre-rulebase, then post-rulebase). Address objects and static groups resolve to
//! networks, service objects and groups to port ranges, `source-user` members to `user:` and
//! `group:` matchers through the operator's [`Mapping`].
//!
//! The output never lets through what PAN-OS denied, beyond what the report calls approximations
//! (zones and applications, which a host firewall cannot see): a rule that cannot be translated
//! faithfully is refused, and when a refused rule could refuse traffic, every later allow rule
//! that could let some of that traffic through is withheld too. Allow rules whose kernel entries
//! would contradict an earlier refusal (see [`super::Policy::cidr_rules`]) are withheld as well.

mod addr;
pub mod cli;
mod render;
#[cfg(test)]
mod tests;
mod xml;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use self::{
    addr::AddrSet,
    xml::{AddressDef, GroupDef, Objects, SourceRule},
};
use super::{Action, Policy, Rule, ServiceSelector, Severity, SourceMatcher, Subject};
use crate::{config::Config, dataplane::Protocol};

pub use render::policy_toml;

/// Why an import could not be done at all.
#[derive(Debug, Error)]
pub enum ImportError {
    /// The PAN-OS configuration is unreadable, malformed, or lacks the part asked for.
    #[error("PAN-OS configuration: {0}")]
    Panos(String),
    /// The mapping file is unreadable or invalid.
    #[error("mapping: {0}")]
    Mapping(String),
    /// Nothing says which addresses are this host's.
    #[error(
        "no host address: pass --host-address (repeatable) or set host_addresses in the mapping"
    )]
    NoHostAddress,
    /// The produced policy failed idgate's own validation (a bug in the importer).
    #[error("the imported policy does not pass idgate's validation (please report this): {0}")]
    SelfCheck(String),
}

/// The operator's mapping file (TOML): which part of the PAN-OS configuration to read, this
/// host's addresses, and what PAN-OS users, groups and applications stand for here.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    /// Firewall configurations: the vsys to read (default `vsys1`).
    #[serde(default)]
    pub vsys: Option<String>,
    /// Panorama configurations: the device group to read (needed when there are several).
    #[serde(default)]
    pub device_group: Option<String>,
    /// This host's addresses (`--host-address` replaces them).
    #[serde(default)]
    pub host_addresses: Vec<IpAddr>,
    /// An `[[issuers]]` URL every identity rule is restricted to.
    #[serde(default)]
    pub issuer: Option<String>,
    /// PAN-OS user names (`corp\alice`, DNs) → user names as the IdP's `user_claim` carries
    /// them.
    #[serde(default)]
    pub users: BTreeMap<String, OneOrMany>,
    /// PAN-OS group names or DNs → group claim values.
    #[serde(default)]
    pub groups: BTreeMap<String, OneOrMany>,
    /// Application names → their ports (`"tcp/22"`, `"udp/5000-5010"`), for rules whose service
    /// is `application-default`.
    #[serde(default)]
    pub applications: BTreeMap<String, Vec<String>>,
}

/// One value or several.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum OneOrMany {
    /// One value.
    One(String),
    /// Several values.
    Many(Vec<String>),
}

impl OneOrMany {
    fn values(&self) -> &[String] {
        match self {
            OneOrMany::One(v) => std::slice::from_ref(v),
            OneOrMany::Many(v) => v,
        }
    }
}

/// A protocol and an inclusive port range.
type PortRange = (Protocol, u16, u16);

impl Mapping {
    /// Parses and checks a mapping file's text.
    pub fn parse(src: &str) -> Result<Mapping, ImportError> {
        let m: Mapping = toml::from_str(src).map_err(|e| ImportError::Mapping(e.to_string()))?;
        for (table, entries) in [("users", &m.users), ("groups", &m.groups)] {
            for (k, v) in entries {
                if v.values().is_empty() || v.values().iter().any(String::is_empty) {
                    return Err(ImportError::Mapping(format!(
                        "[{table}] {k:?}: expected a non-empty value or list of non-empty values"
                    )));
                }
            }
        }
        for (app, specs) in &m.applications {
            for s in specs {
                parse_port_spec(s)
                    .map_err(|e| ImportError::Mapping(format!("[applications] {app:?}: {e}")))?;
            }
        }
        Ok(m)
    }

    /// Reads and checks a mapping file.
    pub fn load(path: &Path) -> Result<Mapping, ImportError> {
        let src = std::fs::read_to_string(path)
            .map_err(|e| ImportError::Mapping(format!("reading {}: {e}", path.display())))?;
        Mapping::parse(&src).map_err(|e| match e {
            ImportError::Mapping(m) => ImportError::Mapping(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// The matchers a `source-user` member stands for, if the mapping names it.
    fn source_user(&self, member: &str) -> Option<Vec<SourceMatcher>> {
        let key = normalize_principal(member);
        let find = |t: &BTreeMap<String, OneOrMany>| {
            t.iter()
                .find(|(k, _)| normalize_principal(k) == key)
                .map(|(_, v)| v.values().to_vec())
        };
        let users = find(&self.users).map(|v| v.into_iter().map(SourceMatcher::User));
        let groups = find(&self.groups).map(|v| v.into_iter().map(SourceMatcher::Group));
        match (users, groups) {
            (None, None) => None,
            (u, g) => Some(
                u.into_iter()
                    .flatten()
                    .chain(g.into_iter().flatten())
                    .collect(),
            ),
        }
    }
}

/// PAN-OS compares user and group names without regard to case; DNs are also compared without
/// the spaces around `,` and `=`.
fn normalize_principal(s: &str) -> String {
    s.split(',')
        .map(|part| part.split('=').map(str::trim).collect::<Vec<_>>().join("="))
        .collect::<Vec<_>>()
        .join(",")
        .to_lowercase()
}

/// `tcp/22`, `udp/5000-5010`.
fn parse_port_spec(s: &str) -> Result<Vec<PortRange>, String> {
    let (proto, ports) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?}: expected <tcp|udp>/<ports>, e.g. \"tcp/22\""))?;
    let proto = match proto {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        other => {
            return Err(format!(
                "{s:?}: unknown protocol {other:?}: expected tcp or udp"
            ));
        }
    };
    Ok(parse_ports(ports)?
        .into_iter()
        .map(|(a, b)| (proto, a, b))
        .collect())
}

/// PAN-OS port lists: `80,443,8000-8010`.
fn parse_ports(s: &str) -> Result<Vec<(u16, u16)>, String> {
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| format!("{s:?}: {p:?} is not a port number 1..=65535"))
    };
    s.split(',')
        .map(|item| match item.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (port(a)?, port(b)?);
                if a > b {
                    return Err(format!("{s:?}: range {item:?} is backwards"));
                }
                Ok((a, b))
            }
            None => port(item).map(|p| (p, p)),
        })
        .collect()
}

/// What became of a PAN-OS rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Imported (possibly with the approximations in its notes).
    Translated,
    /// Not imported, and rightly so: it cannot apply to this host, or it is disabled and
    /// untranslatable.
    Skipped,
    /// Not imported: it cannot be translated faithfully.
    Refused,
    /// Translatable, but not imported because a refused rule before it, or idgate's kernel order,
    /// would make it let through what PAN-OS denies.
    Withheld,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Translated => "translated",
            Status::Skipped => "skipped",
            Status::Refused => "REFUSED",
            Status::Withheld => "WITHHELD",
        })
    }
}

/// One PAN-OS rule's line in the report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RuleReport {
    /// Position in evaluation order, from 1.
    pub position: usize,
    /// The rulebase it comes from.
    pub rulebase: String,
    /// The PAN-OS rule name.
    pub name: String,
    /// The PAN-OS action as written.
    pub action: Option<String>,
    /// What became of it.
    pub status: Status,
    /// The idgate rule's name, when translated.
    pub idgate_rule: Option<String>,
    /// Why it was skipped, refused or withheld.
    pub reasons: Vec<String>,
    /// Choices made and parts ignored in the translation.
    pub notes: Vec<String>,
}

/// The translation report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Report {
    /// What was read (`firewall, vsys1`; `Panorama, device group dc`).
    pub source: String,
    /// The addresses taken as this host's.
    pub host_addresses: Vec<IpAddr>,
    /// The protected services, as `name (tcp/8000)`.
    pub services: Vec<String>,
    /// Every PAN-OS rule in order.
    pub rules: Vec<RuleReport>,
    /// Remarks about the whole import.
    pub notes: Vec<String>,
}

impl Report {
    /// Whether every rule was translated or rightly skipped.
    pub fn is_complete(&self) -> bool {
        self.rules
            .iter()
            .all(|r| matches!(r.status, Status::Translated | Status::Skipped))
    }

    /// How many rules ended with this status.
    pub fn count(&self, status: Status) -> usize {
        self.rules.iter().filter(|r| r.status == status).count()
    }
}

/// The result of an import: the idgate rules (in order), the policy default, and the report.
#[derive(Clone, Debug)]
pub struct Import {
    /// The translated rules, in PAN-OS order.
    pub rules: Vec<Rule>,
    /// For each rule, the index of its PAN-OS rule in the report.
    pub origins: Vec<usize>,
    /// The policy default (the configuration's).
    pub default: Action,
    /// What became of every PAN-OS rule.
    pub report: Report,
}

impl Import {
    /// The `[policy]` section, as TOML.
    pub fn policy_toml(&self) -> String {
        policy_toml(self)
    }
}

/// Translates the PAN-OS configuration `xml` for a host with `config`'s services and the given
/// addresses (none: the mapping's).
pub fn import(
    xml: &str,
    mapping: &Mapping,
    config: &Config,
    host_addresses: &[IpAddr],
) -> Result<Import, ImportError> {
    let hosts: Vec<IpAddr> = if host_addresses.is_empty() {
        mapping.host_addresses.clone()
    } else {
        host_addresses.to_vec()
    };
    if hosts.is_empty() {
        return Err(ImportError::NoHostAddress);
    }
    if let Some(i) = &mapping.issuer
        && !config.issuers.iter().any(|c| c.issuer == *i)
    {
        return Err(ImportError::Mapping(format!(
            "issuer {i:?} is not an [[issuers]] entry of the idgate configuration"
        )));
    }
    let panos = xml::read(
        xml,
        mapping.vsys.as_deref(),
        mapping.device_group.as_deref(),
    )?;
    let cx = Cx {
        scopes: &panos.scopes,
        mapping,
        config,
        hosts: &hosts,
    };
    let mut drafts: Vec<Draft> = panos
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| cx.translate(i + 1, r))
        .collect();
    name_rules(&mut drafts);
    withhold_after_refusals(&mut drafts);
    let mut analysis_notes = withhold_kernel_conflicts(&mut drafts, config);

    let mut rules = Vec::new();
    let mut origins = Vec::new();
    for (i, d) in drafts.iter().enumerate() {
        if d.report.status == Status::Translated
            && let Some(r) = &d.rule
        {
            rules.push(r.clone());
            origins.push(i);
        }
    }
    for (idx, note) in analysis_notes.drain(..) {
        if let Some(&o) = origins.get(idx) {
            drafts[o].report.notes.push(note);
        }
    }
    let default = config.policy.default;
    let report = Report {
        source: panos.source,
        host_addresses: hosts,
        services: config
            .services
            .iter()
            .map(|s| format!("{} ({})", s.name, port_label(s.protocol, s.port, s.port)))
            .collect(),
        rules: drafts.into_iter().map(|d| d.report).collect(),
        notes: vec![format!(
            "PAN-OS's predefined intrazone-default (allow) and interzone-default (deny) rules are \
             not imported: traffic no rule matches gets idgate's default ({default})"
        )],
    };
    let import = Import {
        rules,
        origins,
        default,
        report,
    };
    render::self_check(config, &import.policy_toml()).map_err(ImportError::SelfCheck)?;
    Ok(import)
}

fn port_label(p: Protocol, a: u16, b: u16) -> String {
    let proto = match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    };
    if a == b {
        format!("{proto}/{a}")
    } else {
        format!("{proto}/{a}-{b}")
    }
}

/// One PAN-OS rule on its way through the import.
struct Draft {
    report: RuleReport,
    rule: Option<Rule>,
    /// The PAN-OS action refuses traffic (or is unknown).
    refuses: bool,
    disabled: bool,
    /// The protected services it concerns, where known (`None`: possibly all).
    services: Option<BTreeSet<String>>,
    /// Its source networks, where known (`None`: possibly any).
    sources: Option<AddrSet>,
    /// Its `source-user` is only `unknown`: it concerns traffic without an identity alone.
    unauthenticated_only: bool,
}

/// What a rule's services resolve to.
enum Ports {
    Any,
    Ranges(Vec<PortRange>),
}

struct Cx<'a> {
    scopes: &'a [Objects],
    mapping: &'a Mapping,
    config: &'a Config,
    hosts: &'a [IpAddr],
}

/// Problems found while resolving: each one refuses the rule.
type Problems = Vec<String>;

impl Cx<'_> {
    fn translate(&self, position: usize, r: &SourceRule) -> Draft {
        let mut notes = Vec::new();
        let mut problems = Problems::new();
        let action = match r.action.as_deref() {
            Some("allow") => Some(Action::Allow),
            Some("deny" | "drop") => Some(Action::Drop),
            Some("reset-client" | "reset-both") => Some(Action::Reset),
            Some("reset-server") => {
                notes.push(
                    "reset-server resets only the server side: the client sees a drop".to_owned(),
                );
                Some(Action::Drop)
            }
            Some(other) => {
                problems.push(format!("unknown action {other:?}"));
                None
            }
            None => {
                problems.push("the rule has no action".to_owned());
                None
            }
        };
        let mut draft = Draft {
            report: RuleReport {
                position,
                rulebase: r.rulebase.clone(),
                name: r.name.clone(),
                action: r.action.clone(),
                status: Status::Translated,
                idgate_rule: None,
                reasons: Vec::new(),
                notes: Vec::new(),
            },
            rule: None,
            refuses: action != Some(Action::Allow),
            disabled: r.disabled,
            services: None,
            sources: None,
            unauthenticated_only: r.source_user == ["unknown"],
        };

        // Whether the rule can concern this host at all comes first: if it cannot, nothing else
        // about it matters.
        let mut skip = None;
        match self.destination_applies(r) {
            Ok(true) => {}
            Ok(false) => {
                skip = Some(format!(
                    "destination {} does not include this host ({})",
                    describe(&r.destination, r.negate_destination),
                    join(self.hosts)
                ))
            }
            Err(e) => problems.push(e),
        }
        let ports = self.ports(r, &mut notes, &mut problems);
        let selector = match &ports {
            Some(Ports::Any) => {
                draft.services = Some(
                    self.config
                        .services
                        .iter()
                        .map(|s| s.name.clone())
                        .collect(),
                );
                Some(ServiceSelector::Any)
            }
            Some(Ports::Ranges(ranges)) => {
                let names: Vec<String> = self
                    .config
                    .services
                    .iter()
                    .filter(|s| {
                        ranges
                            .iter()
                            .any(|&(p, a, b)| p == s.protocol && a <= s.port && s.port <= b)
                    })
                    .map(|s| s.name.clone())
                    .collect();
                if names.is_empty() && skip.is_none() {
                    skip = Some(format!(
                        "service {} includes no protected service ({})",
                        r.service.join(", "),
                        self.config
                            .services
                            .iter()
                            .map(|s| format!(
                                "{} {}",
                                s.name,
                                port_label(s.protocol, s.port, s.port)
                            ))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
                draft.services = Some(names.iter().cloned().collect());
                Some(ServiceSelector::Named(names))
            }
            None => None,
        };
        if let Some(reason) = skip {
            draft.report.status = Status::Skipped;
            draft.report.reasons.push(reason);
            if r.disabled {
                draft
                    .report
                    .notes
                    .push("also disabled in PAN-OS".to_owned());
            }
            return draft;
        }

        let sources = self.sources(r, &mut problems);
        if let Some(s) = &sources
            && s.is_empty()
        {
            draft.report.status = Status::Skipped;
            draft
                .report
                .reasons
                .push("negate-source with source any: the rule matches no address".to_owned());
            return draft;
        }
        draft.sources = sources.clone();
        let matchers = self.source_users(r, &mut problems);

        let zones: Vec<String> = [("from", &r.from), ("to", &r.to)]
            .into_iter()
            .filter(|(_, z)| !z.is_empty() && z.iter().any(|z| z != "any"))
            .map(|(k, z)| format!("{k} {}", z.join(", ")))
            .collect();
        if !zones.is_empty() {
            notes.push(format!(
                "zones ignored ({}): a host has no zones",
                zones.join("; ")
            ));
        }
        if let Some(t) = r.rule_type.as_deref().filter(|t| *t != "universal") {
            notes.push(format!("rule-type {t} ignored: it is about zones"));
        }
        let apps: Vec<&String> = r.application.iter().filter(|a| *a != "any").collect();
        if !apps.is_empty() {
            let kind = if action == Some(Action::Allow) {
                "the rule allows every application on its ports"
            } else {
                "the rule refuses every application on its ports"
            };
            notes.push(format!(
                "application {} not enforced (idgate sees ports, not applications): {kind}",
                apps.iter()
                    .map(|a| a.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        for (what, list) in [
            ("category", &r.category),
            ("source-hip", &r.source_hip),
            ("destination-hip", &r.destination_hip),
        ] {
            if list.iter().any(|x| x != "any") {
                problems.push(format!(
                    "{what} {} cannot be matched by idgate",
                    list.join(", ")
                ));
            }
        }
        if let Some(s) = &r.schedule {
            problems.push(format!(
                "schedule {s:?} cannot be honoured: idgate rules apply at all times"
            ));
        }

        if !problems.is_empty() {
            if r.disabled {
                draft.report.status = Status::Skipped;
                draft.report.reasons.push(format!(
                    "disabled in PAN-OS, so it decides nothing; not imported as a disabled rule because: {}",
                    problems.join("; ")
                ));
            } else {
                draft.report.status = Status::Refused;
                draft.report.reasons = problems;
            }
            draft.report.notes = notes;
            return draft;
        }
        let (Some(action), Some(services), Some(sources), Some(matchers)) =
            (action, selector, sources, matchers)
        else {
            // Unreachable: every `None` above came with a problem.
            draft.report.status = Status::Refused;
            draft
                .report
                .reasons
                .push("the rule could not be resolved".to_owned());
            return draft;
        };
        if r.disabled {
            notes.push("disabled in PAN-OS: imported with enabled = false".to_owned());
        }
        let is_identity = matchers.iter().any(|m| *m != SourceMatcher::Any);
        draft.rule = Some(Rule {
            name: String::new(),
            enabled: !r.disabled,
            description: Some(match &r.description {
                Some(d) => format!("PAN-OS {:?}: {d}", r.name),
                None => format!("PAN-OS {:?}", r.name),
            }),
            issuer: if is_identity {
                self.mapping.issuer.clone()
            } else {
                None
            },
            sources: matchers,
            source_cidrs: if sources.is_any() {
                Vec::new()
            } else {
                sources.to_cidrs()
            },
            services,
            action,
            max_session_lifetime: None,
            idle_timeout: None,
            log: r.log_start || r.log_end,
        });
        draft.report.notes = notes;
        draft
    }

    /// Whether the destination includes every host address (`Ok(false)`: none of them).
    fn destination_applies(&self, r: &SourceRule) -> Result<bool, String> {
        let mut unsupported = Vec::new();
        let mut set = self
            .addresses(&r.destination, &mut unsupported)
            .map_err(|e| format!("destination: {e}"))?;
        if r.negate_destination {
            if !unsupported.is_empty() {
                return Err(format!(
                    "negated destination holds {}, so whether it includes this host is unknown",
                    unsupported.join(", ")
                ));
            }
            set = set.complement();
        }
        let inside = self.hosts.iter().filter(|h| set.contains(**h)).count();
        if inside == self.hosts.len() {
            return Ok(true);
        }
        if !unsupported.is_empty() {
            return Err(format!(
                "destination holds {}, which may or may not be this host",
                unsupported.join(", ")
            ));
        }
        if inside == 0 {
            return Ok(false);
        }
        Err(format!(
            "destination includes only some of this host's addresses ({}), and idgate rules \
             cannot tell destination addresses apart",
            join(
                &self
                    .hosts
                    .iter()
                    .filter(|h| set.contains(**h))
                    .collect::<Vec<_>>()
            )
        ))
    }

    /// The source networks (after negation); `None` with a problem recorded.
    fn sources(&self, r: &SourceRule, problems: &mut Problems) -> Option<AddrSet> {
        let mut unsupported = Vec::new();
        let set = match self.addresses(&r.source, &mut unsupported) {
            Ok(s) => s,
            Err(e) => {
                problems.push(format!("source: {e}"));
                return None;
            }
        };
        if !unsupported.is_empty() {
            problems.push(format!("source holds {}", unsupported.join(", ")));
            return None;
        }
        Some(if r.negate_source {
            set.complement()
        } else {
            set
        })
    }

    /// The addresses of a member list (`[]` and `any`: every address); members idgate cannot
    /// resolve are added to `unsupported`.
    fn addresses(
        &self,
        members: &[String],
        unsupported: &mut Vec<String>,
    ) -> Result<AddrSet, String> {
        let mut set = AddrSet::default();
        if members.is_empty() || members.iter().any(|m| m == "any") {
            return Ok(AddrSet::any());
        }
        for m in members {
            self.address(m, &mut set, unsupported, &mut Vec::new())?;
        }
        Ok(set)
    }

    fn address(
        &self,
        name: &str,
        set: &mut AddrSet,
        unsupported: &mut Vec<String>,
        stack: &mut Vec<String>,
    ) -> Result<(), String> {
        for scope in self.scopes {
            if let Some(def) = scope.addresses.get(name) {
                return match def {
                    AddressDef::IpNetmask(v) | AddressDef::IpRange(v) => literal(v, set)
                        .ok_or_else(|| format!("address {name:?} has an unreadable value {v:?}")),
                    AddressDef::Unsupported(kind, v) => {
                        unsupported.push(format!("address {name:?} ({kind} {v}, unsupported)"));
                        Ok(())
                    }
                };
            }
            if let Some(group) = scope.address_groups.get(name) {
                if stack.iter().any(|s| s == name) {
                    return Err(format!(
                        "address groups form a cycle: {} -> {name}",
                        stack.join(" -> ")
                    ));
                }
                match group {
                    GroupDef::Static(members) => {
                        stack.push(name.to_owned());
                        for m in members {
                            self.address(m, set, unsupported, stack)?;
                        }
                        stack.pop();
                    }
                    GroupDef::Dynamic(filter) => unsupported.push(format!(
                        "dynamic address group {name:?} (filter {filter:?}, unsupported: its members are only known on the firewall)"
                    )),
                }
                return Ok(());
            }
        }
        literal(name, set).ok_or_else(|| {
            format!("{name:?} is neither an address object, an address group, nor an address")
        })
    }

    fn ports(
        &self,
        r: &SourceRule,
        notes: &mut Vec<String>,
        problems: &mut Problems,
    ) -> Option<Ports> {
        if r.service.is_empty() {
            problems.push("the rule has no service".to_owned());
            return None;
        }
        if r.service.iter().any(|s| s == "any") {
            return Some(Ports::Any);
        }
        let mut ranges = Vec::new();
        let before = problems.len();
        for m in &r.service {
            if m == "application-default" {
                self.application_ports(r, &mut ranges, notes, problems);
            } else {
                self.service(m, &mut ranges, notes, problems, &mut Vec::new());
            }
        }
        (problems.len() == before).then_some(Ports::Ranges(ranges))
    }

    fn application_ports(
        &self,
        r: &SourceRule,
        ranges: &mut Vec<PortRange>,
        notes: &mut Vec<String>,
        problems: &mut Problems,
    ) {
        if r.application.is_empty() || r.application.iter().any(|a| a == "any") {
            problems.push("service application-default with application any: the ports of every application are not known here; name the ports instead".to_owned());
            return;
        }
        for app in &r.application {
            match self.mapping.applications.get(app) {
                Some(specs) => {
                    for s in specs {
                        // Checked when the mapping was read.
                        ranges.extend(parse_port_spec(s).unwrap_or_default());
                    }
                    notes.push(format!("application-default: {app} taken as {} (mapping)", specs.join(", ")));
                }
                None => problems.push(format!(
                    "service application-default: the default ports of application {app:?} are not known; add them to [applications] in the mapping"
                )),
            }
        }
    }

    fn service(
        &self,
        name: &str,
        ranges: &mut Vec<PortRange>,
        notes: &mut Vec<String>,
        problems: &mut Problems,
        stack: &mut Vec<String>,
    ) {
        for scope in self.scopes {
            if let Some(def) = scope.services.get(name) {
                let proto = match def.protocol.as_str() {
                    "tcp" => Protocol::Tcp,
                    "udp" => Protocol::Udp,
                    other => {
                        notes.push(format!(
                            "service {name:?} is {other}: idgate protects only tcp and udp"
                        ));
                        return;
                    }
                };
                if let Some(sp) = &def.source_port {
                    problems.push(format!(
                        "service {name:?} has source-port {sp}, which idgate cannot match"
                    ));
                    return;
                }
                match parse_ports(&def.ports) {
                    Ok(p) => ranges.extend(p.into_iter().map(|(a, b)| (proto, a, b))),
                    Err(e) => problems.push(format!("service {name:?}: {e}")),
                }
                return;
            }
            if let Some(members) = scope.service_groups.get(name) {
                if stack.iter().any(|s| s == name) {
                    problems.push(format!(
                        "service groups form a cycle: {} -> {name}",
                        stack.join(" -> ")
                    ));
                    return;
                }
                stack.push(name.to_owned());
                for m in members {
                    self.service(m, ranges, notes, problems, stack);
                }
                stack.pop();
                return;
            }
        }
        match name {
            // PAN-OS's predefined services.
            "service-http" => ranges.extend([(Protocol::Tcp, 80, 80), (Protocol::Tcp, 8080, 8080)]),
            "service-https" => ranges.push((Protocol::Tcp, 443, 443)),
            _ => problems.push(format!(
                "service {name:?} is neither a service object nor a service group"
            )),
        }
    }

    fn source_users(&self, r: &SourceRule, problems: &mut Problems) -> Option<Vec<SourceMatcher>> {
        let mut out: Vec<SourceMatcher> = Vec::new();
        let mut ok = true;
        if r.source_user.is_empty() || r.source_user.iter().any(|u| u == "any") {
            return Some(vec![SourceMatcher::Any]);
        }
        for u in &r.source_user {
            let found = match u.as_str() {
                "known-user" => Some(vec![SourceMatcher::KnownUser]),
                "unknown" => {
                    problems.push("source-user unknown (traffic without a user) has no idgate equivalent: a rule without identity condition would also match known users".to_owned());
                    ok = false;
                    continue;
                }
                "pre-logon" => {
                    problems.push(
                        "source-user pre-logon (GlobalProtect) has no idgate equivalent".to_owned(),
                    );
                    ok = false;
                    continue;
                }
                name => self.mapping.source_user(name),
            };
            match found {
                Some(ms) => {
                    for m in ms {
                        if !out.contains(&m) {
                            out.push(m);
                        }
                    }
                }
                None => {
                    problems.push(format!(
                        "source-user {u:?} is in neither [users] nor [groups] of the mapping"
                    ));
                    ok = false;
                }
            }
        }
        // known-user already matches every identity the other matchers would.
        if out.contains(&SourceMatcher::KnownUser) {
            out = vec![SourceMatcher::KnownUser];
        }
        ok.then_some(out)
    }
}

/// A literal address (`10.0.0.1`), network (`10.0.0.0/8`; host bits are ignored, as PAN-OS
/// matches the network) or range (`10.0.0.1-10.0.0.9`).
fn literal(s: &str, set: &mut AddrSet) -> Option<()> {
    let s = s.trim();
    if let Ok(n) = s.parse::<ipnet::IpNet>() {
        set.insert_net(n);
        return Some(());
    }
    if let Ok(a) = s.parse::<IpAddr>() {
        set.insert_net(ipnet::IpNet::from(a));
        return Some(());
    }
    let (a, b) = s.split_once('-')?;
    set.insert_range(a.trim().parse().ok()?, b.trim().parse().ok()?)
}

fn describe(members: &[String], negate: bool) -> String {
    let list = if members.is_empty() {
        "any".to_owned()
    } else {
        members.join(", ")
    };
    if negate {
        format!("not ({list})")
    } else {
        list
    }
}

fn join<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// An idgate rule name from a PAN-OS one (which may hold spaces): other characters become `-`,
/// and duplicates get a suffix.
fn name_rules(drafts: &mut [Draft]) {
    let mut used = BTreeSet::new();
    for d in drafts.iter_mut() {
        let Some(rule) = &mut d.rule else { continue };
        let mut base = String::new();
        for c in d.report.name.chars() {
            let c = if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            };
            if !(c == '-' && base.ends_with('-')) {
                base.push(c);
            }
        }
        let base = base
            .trim_start_matches(|c: char| !c.is_ascii_alphanumeric())
            .trim_end_matches('-');
        let base: String = if base.is_empty() {
            "rule".to_owned()
        } else {
            base.chars().take(56).collect()
        };
        let mut name = base.clone();
        let mut n = 2;
        while !used.insert(name.clone()) {
            name = format!("{base}-{n}");
            n += 1;
        }
        if name != d.report.name {
            d.report.notes.push(format!("named {name:?} in idgate"));
        }
        d.report.idgate_rule = Some(name.clone());
        rule.name = name;
    }
}

/// Withholds every allow rule that a refused, enabled rule before it could have refused some of
/// the traffic of: without the refused rule, that traffic would reach the allow.
fn withhold_after_refusals(drafts: &mut [Draft]) {
    let mut refusals: Vec<usize> = Vec::new();
    for i in 0..drafts.len() {
        let d = &drafts[i];
        if d.report.status == Status::Refused && d.refuses && !d.disabled {
            refusals.push(i);
            continue;
        }
        let Some(rule) = d
            .rule
            .as_ref()
            .filter(|r| r.enabled && r.action == Action::Allow)
        else {
            continue;
        };
        if d.report.status != Status::Translated {
            continue;
        }
        let mine = d.services.clone().unwrap_or_default();
        let my_sources = d.sources.clone().unwrap_or_else(AddrSet::any);
        // Traffic without an identity never reaches an identity rule.
        let reachable_unauthenticated = rule.is_static();
        let blocker = refusals.iter().find(|&&b| {
            let r = &drafts[b];
            r.services.as_ref().is_none_or(|s| !s.is_disjoint(&mine))
                && r.sources.as_ref().is_none_or(|s| s.overlaps(&my_sources))
                && (!r.unauthenticated_only || reachable_unauthenticated)
        });
        if let Some(&b) = blocker {
            let reason = format!(
                "follows refused rule {:?} (#{}, action {}), which may refuse some of the traffic \
                 {:?} allows: importing this rule without it could let through what PAN-OS denies",
                drafts[b].report.name,
                drafts[b].report.position,
                drafts[b].report.action.as_deref().unwrap_or("none"),
                rule.name,
            );
            let d = &mut drafts[i];
            d.report.status = Status::Withheld;
            d.report.reasons.push(reason);
            d.report.idgate_rule = None;
        }
    }
}

/// Runs idgate's policy analysis on the rules as they stand and withholds the allow rules it
/// finds the kernel could not honour, until none is left. Returns the analysis's warnings as
/// (index among the kept rules, message).
fn withhold_kernel_conflicts(drafts: &mut [Draft], config: &Config) -> Vec<(usize, String)> {
    loop {
        let kept: Vec<usize> = (0..drafts.len())
            .filter(|&i| drafts[i].report.status == Status::Translated && drafts[i].rule.is_some())
            .collect();
        let rules: Vec<&Rule> = kept
            .iter()
            .filter_map(|&i| drafts[i].rule.as_ref())
            .collect();
        let policy = Policy::build(
            &config.services,
            rules.iter().copied().enumerate(),
            config.policy.default,
            config.dataplane.max_session_lifetime,
        );
        let findings = policy.analyse().findings;
        let mut changed = false;
        let mut warnings = Vec::new();
        for f in findings {
            let Subject::Rule(idx) = f.subject else {
                continue;
            };
            match f.severity {
                Severity::Error => {
                    if let Some(&i) = kept.get(idx) {
                        let d = &mut drafts[i];
                        // Withholding an allow is safe; a refusing rule idgate cannot take is a
                        // refusal, which withholds the allows after it in turn.
                        d.report.status = if d.refuses {
                            Status::Refused
                        } else {
                            Status::Withheld
                        };
                        d.report.idgate_rule = None;
                        d.report
                            .reasons
                            .push(format!("idgate would refuse it: {}", f.message));
                        changed = true;
                    }
                }
                Severity::Warning => warnings.push((idx, format!("idgate: {}", f.message))),
            }
        }
        if !changed {
            return warnings;
        }
        withhold_after_refusals(drafts);
    }
}
