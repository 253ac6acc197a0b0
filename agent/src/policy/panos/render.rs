//! The import's outputs: the `[policy]` TOML, the report as text, and the check that idgate's own
//! parser accepts the policy.

use std::fmt::{self, Write as _};

use super::{Import, Report, Status};
use crate::{
    config::{Config, format_duration},
    policy::{ServiceSelector, SourceMatcher, service_action_name},
};

/// A TOML basic string.
fn q(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn list<T: ToString>(items: &[T]) -> String {
    let items: Vec<String> = items.iter().map(|i| q(&i.to_string())).collect();
    format!("[{}]", items.join(", "))
}

/// The `[policy]` section of an import, with a comment naming each rule's PAN-OS origin.
pub fn policy_toml(import: &Import) -> String {
    let r = &import.report;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Imported by `idgate policy import-panos` from PAN-OS ({}), for host address(es) {}.",
        r.source,
        super::join(&r.host_addresses)
    );
    let _ = writeln!(
        out,
        "# Replaces the [policy] section of the idgate configuration. The report says what became of each PAN-OS rule."
    );
    if !r.is_complete() {
        let _ = writeln!(
            out,
            "# PARTIAL: {} PAN-OS rule(s) refused and {} withheld; nothing here allows what PAN-OS denied.",
            r.count(Status::Refused),
            r.count(Status::Withheld)
        );
    }
    let _ = writeln!(
        out,
        "\n[policy]\ndefault = {}",
        q(&import.default.to_string())
    );
    for (rule, &origin) in import.rules.iter().zip(&import.origins) {
        let o = &r.rules[origin];
        let _ = writeln!(
            out,
            "\n# PAN-OS #{} {} ({})\n[[policy.rules]]\nname = {}",
            o.position,
            q(&o.name),
            o.rulebase,
            q(&rule.name)
        );
        if !rule.enabled {
            out.push_str("enabled = false\n");
        }
        if let Some(d) = &rule.description {
            let _ = writeln!(out, "description = {}", q(d));
        }
        if let Some(i) = &rule.issuer {
            let _ = writeln!(out, "issuer = {}", q(i));
        }
        if rule.sources != [SourceMatcher::Any] {
            let _ = writeln!(out, "sources = {}", list(&rule.sources));
        }
        if !rule.source_cidrs.is_empty() {
            let _ = writeln!(out, "source_cidrs = {}", list(&rule.source_cidrs));
        }
        let services = match &rule.services {
            ServiceSelector::Any => list(&["any"]),
            ServiceSelector::Named(n) => list(n),
        };
        let _ = writeln!(
            out,
            "services = {services}\naction = {}",
            q(&rule.action.to_string())
        );
        if !rule.log {
            out.push_str("log = false\n");
        }
    }
    out
}

/// Parses `policy` together with `config`'s services, issuers and session endpoint port, as
/// `check-config` would; the error lists idgate's complaints.
pub(super) fn self_check(config: &Config, policy: &str) -> Result<(), String> {
    let mut doc = format!(
        "[dataplane]\ninterfaces = [{{ name = \"lo\" }}]\nmax_session_lifetime = {}\n",
        q(&format_duration(config.dataplane.max_session_lifetime))
    );
    for s in &config.services {
        let _ = writeln!(
            doc,
            "\n[[services]]\nname = {}\nprotocol = {}\nport = {}\naction = {}",
            q(&s.name),
            q(&s.protocol.to_string()),
            s.port,
            q(service_action_name(s.action))
        );
    }
    for i in &config.issuers {
        let _ = writeln!(
            doc,
            "\n[[issuers]]\nissuer = {}\naudiences = {}\nallow_http = {}",
            q(&i.issuer),
            list(&i.audiences),
            i.allow_http
        );
    }
    // The same port, so that the lock-out check sees what the real configuration has.
    let _ = writeln!(
        doc,
        "\n[session_endpoint]\nlisten = \"127.0.0.1:{}\"\n",
        config.session_endpoint.listen.port()
    );
    doc.push_str(policy);
    Config::parse(&doc).map(|_| ()).map_err(|e| e.to_string())
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "PAN-OS import report: {}", self.source)?;
        writeln!(f, "host address(es): {}", super::join(&self.host_addresses))?;
        writeln!(f, "protected services: {}", self.services.join(", "))?;
        writeln!(f)?;
        for r in &self.rules {
            write!(
                f,
                "#{} {:?} ({}, action {}): {}",
                r.position,
                r.name,
                r.rulebase,
                r.action.as_deref().unwrap_or("none"),
                r.status
            )?;
            match &r.idgate_rule {
                Some(n) if r.status == Status::Translated => writeln!(f, " as {n:?}")?,
                _ => writeln!(f)?,
            }
            for why in &r.reasons {
                writeln!(f, "    because: {why}")?;
            }
            for note in &r.notes {
                writeln!(f, "    note: {note}")?;
            }
        }
        writeln!(f)?;
        for note in &self.notes {
            writeln!(f, "note: {note}")?;
        }
        writeln!(
            f,
            "summary: {} rules: {} translated, {} skipped, {} refused, {} withheld",
            self.rules.len(),
            self.count(Status::Translated),
            self.count(Status::Skipped),
            self.count(Status::Refused),
            self.count(Status::Withheld)
        )?;
        if !self.is_complete() {
            writeln!(
                f,
                "PARTIAL: refused rules could not be translated faithfully; withheld allow rules \
                 follow a refusal they could override, or contradict idgate's kernel order. \
                 The partial policy allows nothing PAN-OS denied."
            )?;
        }
        Ok(())
    }
}
