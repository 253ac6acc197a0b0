//! Compiles static rules into kernel CIDR entries (the rule is documented on
//! [`Policy::cidr_rules`]) and finds rules and services that cannot work as written.

use std::collections::BTreeSet;

use ipnet::IpNet;

use super::{Action, Policy, PolicyRule, PolicyService, service_action_name};
use crate::dataplane::{CidrAction, CidrRule, ServiceAction};

/// How serious a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Severity {
    /// The configuration is refused.
    Error,
    /// The configuration is accepted, but probably does not do what was meant.
    Warning,
}

/// What a finding is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Subject {
    /// The rule at this position in the file.
    Rule(usize),
    /// The service at this position in the file.
    Service(usize),
}

/// One problem found by the analysis.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Finding {
    pub(crate) severity: Severity,
    pub(crate) subject: Subject,
    pub(crate) message: String,
}

/// The compiled entries and the findings.
#[derive(Clone, Debug, Default)]
pub(crate) struct Analysis {
    pub(crate) entries: Vec<CidrRule>,
    pub(crate) findings: Vec<Finding>,
}

/// How an earlier rule's network for one service stands, as later rules see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// An identity rule (never a kernel entry).
    Identity,
    /// A static rule written as a kernel entry.
    Compiled,
    /// A static rule left to token time (or refused).
    NotCompiled,
    /// A static rule's network inside an earlier static rule's: never reached.
    Covered,
}

#[derive(Clone, Copy, Debug)]
struct Earlier {
    rule: usize,
    net: IpNet,
    action: Action,
    kind: Kind,
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Rule index in `policy.rules` → position in the file (ids are position + 1).
fn file_index(r: &PolicyRule) -> usize {
    r.id as usize - 1
}

/// Per rule, what happened to its entries, gathered for one message per rule.
#[derive(Default)]
struct RuleNotes {
    /// (service, net, blocking rule) for deny entries left to token time.
    deferred: Vec<(String, IpNet, usize)>,
    /// (service, net, conflicting rule) for allow entries the kernel cannot honour.
    conflicts: Vec<(String, IpNet, usize)>,
    compiled_reset: bool,
    /// Per (service, net): the earlier static rules covering it, if any.
    covered_by: Vec<Option<usize>>,
}

pub(super) fn analyse(policy: &Policy) -> Analysis {
    let mut out = Analysis::default();
    let mut notes: Vec<RuleNotes> = policy.rules.iter().map(|_| RuleNotes::default()).collect();

    for s in &policy.services {
        let mut earlier: Vec<Earlier> = Vec::new();
        for (ri, r) in policy.rules.iter().enumerate() {
            if !r.rule.enabled || !r.applies_to(s.id) {
                continue;
            }
            for net in r.rule.effective_cidrs() {
                if !r.rule.is_static() {
                    let covered = earlier
                        .iter()
                        .find(|e| e.kind != Kind::Identity && e.net.contains(&net));
                    notes[ri].covered_by.push(covered.map(|e| e.rule));
                    earlier.push(Earlier {
                        rule: ri,
                        net,
                        action: r.rule.action,
                        kind: Kind::Identity,
                    });
                    continue;
                }
                let kind = compile_entry(s, ri, r, net, &earlier, &mut notes, &mut out);
                earlier.push(Earlier {
                    rule: ri,
                    net,
                    action: r.rule.action,
                    kind,
                });
            }
        }
    }

    for (ri, n) in notes.iter().enumerate() {
        report_rule(policy, ri, n, &mut out.findings);
    }
    report_services(policy, &notes, &mut out.findings);
    out
}

/// Decides one static (service, network) entry and records why.
fn compile_entry(
    s: &PolicyService,
    ri: usize,
    r: &PolicyRule,
    net: IpNet,
    earlier: &[Earlier],
    notes: &mut [RuleNotes],
    out: &mut Analysis,
) -> Kind {
    let covering = earlier
        .iter()
        .find(|e| e.kind != Kind::Identity && e.net.contains(&net));
    notes[ri].covered_by.push(covering.map(|e| e.rule));
    if covering.is_some() {
        return Kind::Covered;
    }
    let overlapping = || earlier.iter().filter(|e| overlaps(&e.net, &net));
    let name = s.config.name.clone();
    if r.rule.action == Action::Allow {
        // An earlier refusal the kernel cannot apply before its allow entry.
        let conflict = overlapping().find(|e| {
            e.action != Action::Allow && matches!(e.kind, Kind::Identity | Kind::NotCompiled)
        });
        if let Some(e) = conflict {
            notes[ri].conflicts.push((name, net, e.rule));
            return Kind::NotCompiled;
        }
        push_entry(out, s, r, net, CidrAction::Allow);
        Kind::Compiled
    } else {
        let blocker = overlapping().find(|e| e.action == Action::Allow && e.kind != Kind::Covered);
        if let Some(e) = blocker {
            notes[ri].deferred.push((name, net, e.rule));
            return Kind::NotCompiled;
        }
        if r.rule.action == Action::Reset {
            notes[ri].compiled_reset = true;
        }
        push_entry(out, s, r, net, CidrAction::Deny);
        Kind::Compiled
    }
}

fn push_entry(
    out: &mut Analysis,
    s: &PolicyService,
    r: &PolicyRule,
    net: IpNet,
    action: CidrAction,
) {
    out.entries.push(CidrRule {
        service: s.id,
        net,
        action,
        rule_id: r.id,
    });
}

fn rule_name(policy: &Policy, ri: usize) -> &str {
    &policy.rules[ri].rule.name
}

/// "svc from 10.0.0.0/8, svc2 from 0.0.0.0/0", each pair once.
fn pairs(items: &[(String, IpNet, usize)]) -> String {
    let mut seen = BTreeSet::new();
    items
        .iter()
        .filter(|(s, n, _)| seen.insert((s.clone(), *n)))
        .map(|(s, n, _)| format!("`{s}` from {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn report_rule(policy: &Policy, ri: usize, n: &RuleNotes, findings: &mut Vec<Finding>) {
    let r = &policy.rules[ri];
    let subject = Subject::Rule(file_index(r));
    let name = &r.rule.name;
    if let Some((_, _, e)) = n.conflicts.first() {
        let other = &policy.rules[*e];
        let why = if other.rule.is_static() {
            format!(
                "earlier rule `{}` ({}) could not become a kernel deny entry itself, so the kernel \
                 cannot refuse those sources before this allow entry",
                other.rule.name, other.rule.action
            )
        } else {
            format!(
                "earlier identity rule `{}` ({}) can refuse traffic from those sources, and the \
                 kernel checks CIDR allow entries before sessions, so it would let that traffic \
                 through",
                other.rule.name, other.rule.action
            )
        };
        findings.push(Finding {
            severity: Severity::Error,
            subject,
            message: format!(
                "rule `{name}` allows {} without a token, but {why}; move `{name}` above `{}`, \
                 or narrow its source_cidrs",
                pairs(&n.conflicts),
                other.rule.name
            ),
        });
    }
    if let Some((_, _, e)) = n.deferred.first() {
        let reset_services: Vec<&str> = n
            .deferred
            .iter()
            .filter(|(s, _, _)| {
                r.rule.action == Action::Drop
                    && policy
                        .services
                        .iter()
                        .any(|x| x.config.name == *s && x.config.action == ServiceAction::Reset)
            })
            .map(|(s, _, _)| s.as_str())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let reset_note = if reset_services.is_empty() {
            String::new()
        } else {
            format!(
                " (a RST from {}, not a silent drop)",
                reset_services
                    .iter()
                    .map(|s| format!("`{s}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        findings.push(Finding {
            severity: Severity::Warning,
            subject,
            message: format!(
                "rule `{name}` ({}) is not a kernel deny entry for {}: earlier rule `{}` can \
                 allow that traffic, and the kernel checks deny entries before everything else. \
                 It applies when tokens are presented; traffic without a session gets the \
                 service's action{reset_note}. Move `{name}` above `{}` to refuse these sources \
                 for everyone",
                r.rule.action,
                pairs(&n.deferred),
                rule_name(policy, *e),
                rule_name(policy, *e),
            ),
        });
    }
    if n.compiled_reset {
        findings.push(Finding {
            severity: Severity::Warning,
            subject,
            message: format!(
                "rule `{name}` has action reset but no identity condition: it becomes kernel CIDR \
                 deny entries, which drop silently (no RST); write action = \"drop\" to say so"
            ),
        });
    }
    if r.rule.enabled
        && r.rule.is_static()
        && r.rule.source_cidrs.is_empty()
        && r.rule.action == Action::Allow
        && n.conflicts.is_empty()
    {
        findings.push(Finding {
            severity: Severity::Warning,
            subject,
            message: format!(
                "rule `{name}` allows every source address without a token: its services are \
                 open to everyone from this rule on"
            ),
        });
    }
    if r.rule.enabled && !n.covered_by.is_empty() && n.covered_by.iter().all(Option::is_some) {
        let by: BTreeSet<&str> = n
            .covered_by
            .iter()
            .flatten()
            .map(|e| rule_name(policy, *e))
            .collect();
        findings.push(Finding {
            severity: Severity::Warning,
            subject,
            message: format!(
                "rule `{name}` can never match: earlier rule{} {} without identity conditions \
                 match all of its services and sources first",
                if by.len() == 1 { "" } else { "s" },
                by.iter()
                    .map(|b| format!("`{b}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
    }
}

fn report_services(policy: &Policy, notes: &[RuleNotes], findings: &mut Vec<Finding>) {
    for (si, s) in policy.services.iter().enumerate() {
        let allowed = policy.rules.iter().zip(notes).any(|(r, n)| {
            let shadowed = !n.covered_by.is_empty() && n.covered_by.iter().all(Option::is_some);
            r.rule.enabled && r.rule.action == Action::Allow && r.applies_to(s.id) && !shadowed
        });
        if !allowed {
            findings.push(Finding {
                severity: Severity::Warning,
                subject: Subject::Service(si),
                message: format!(
                    "no enabled rule can allow service `{}` ({}/{}): all of its traffic gets its \
                     action ({})",
                    s.config.name,
                    s.config.protocol,
                    s.config.port,
                    service_action_name(s.config.action)
                ),
            });
        }
    }
}
