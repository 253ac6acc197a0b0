use std::{net::IpAddr, time::Duration};

use serde_json::json;

use super::*;
use crate::{
    config::{Config, Diagnostic},
    dataplane::CidrAction,
};

const OKTA: &str = "https://idp.example.com";
const KC: &str = "https://kc.example.com/realms/corp";

/// Services `api` (id 1, tcp/8000, reset) and `dns` (id 2, udp/53, drop), two issuers, default
/// drop, a 12h global lifetime; rules are appended.
const BASE: &str = r#"
[dataplane]
interfaces = [{ name = "eth0" }]
max_session_lifetime = "12h"

[[services]]
name = "api"
protocol = "tcp"
port = 8000
action = "reset"

[[services]]
name = "dns"
protocol = "udp"
port = 53

[[issuers]]
issuer = "https://idp.example.com"
audiences = ["idgate"]

[[issuers]]
issuer = "https://kc.example.com/realms/corp"
audiences = ["idgate"]

[session_endpoint]
listen = "0.0.0.0:8443"
tls_cert = "/etc/idgate/cert.pem"
tls_key = "/etc/idgate/key.pem"

[policy]
default = "drop"
"#;

fn parse(rules: &str) -> Result<(Config, Vec<Diagnostic>), crate::config::ConfigErrors> {
    Config::parse(&format!("{BASE}{rules}"))
}

fn policy(rules: &str) -> Policy {
    match parse(rules) {
        Ok((c, _)) => c.policy(),
        Err(e) => panic!("{e}"),
    }
}

fn warnings(rules: &str) -> Vec<Diagnostic> {
    match parse(rules) {
        Ok((_, w)) => w,
        Err(e) => panic!("{e}"),
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn who(user: &str, groups: &[&str]) -> Identity {
    Identity {
        issuer: OKTA.to_owned(),
        user: user.to_owned(),
        groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        scopes: Vec::new(),
        claims: json!({}),
    }
}

/// (service name, action, rule name) per service.
fn summary(d: &[ServiceDecision]) -> Vec<(String, Action, Option<String>)> {
    d.iter()
        .map(|x| {
            (
                x.service.clone(),
                x.action,
                x.rule.as_ref().map(|r| r.name.clone()),
            )
        })
        .collect()
}

/// The decision for service `api` (id 1).
fn api(d: &[ServiceDecision]) -> (Action, Option<&str>) {
    let x = &d[0];
    assert_eq!(x.service, "api");
    (x.action, x.rule.as_ref().map(|r| r.name.as_str()))
}

fn rule(name: &str, body: &str) -> String {
    format!("[[policy.rules]]\nname = \"{name}\"\n{body}\n")
}

#[test]
fn first_match_wins_in_file_order() {
    let allow = rule(
        "allow-a",
        "sources = [\"group:a\"]\nservices = [\"api\"]\naction = \"allow\"",
    );
    let drop = rule(
        "drop-a",
        "sources = [\"group:a\"]\nservices = [\"api\"]\naction = \"drop\"",
    );
    let src = ip("192.0.2.1");
    let p = policy(&format!("{allow}{drop}"));
    assert_eq!(
        api(&p.evaluate(&who("u", &["a"]), src)),
        (Action::Allow, Some("allow-a"))
    );
    let p = policy(&format!("{drop}{allow}"));
    assert_eq!(
        api(&p.evaluate(&who("u", &["a"]), src)),
        (Action::Drop, Some("drop-a"))
    );
}

#[test]
fn the_default_decides_when_nothing_matches() {
    let p = policy(&rule(
        "a",
        "sources = [\"group:a\"]\nservices = [\"api\"]\naction = \"allow\"",
    ));
    let d = p.evaluate(&who("u", &["b"]), ip("192.0.2.1"));
    assert_eq!(
        summary(&d),
        vec![
            ("api".into(), Action::Drop, None),
            ("dns".into(), Action::Drop, None)
        ]
    );
    assert_eq!(d[0].rule_id(), 0);
    assert!(!d[0].needs_session);
    assert_eq!(d[0].max_session_lifetime, None);
    let src = format!(
        "{}{}",
        BASE.replace("default = \"drop\"", "default = \"reset\""),
        rule(
            "a",
            "sources = [\"group:a\"]\nservices = [\"api\"]\naction = \"allow\""
        )
    );
    let p = Config::parse(&src).unwrap().0.policy();
    assert_eq!(p.default_action(), Action::Reset);
    assert_eq!(
        api(&p.evaluate(&who("u", &[]), ip("192.0.2.1"))),
        (Action::Reset, None)
    );
}

#[test]
fn any_source_matches_with_and_without_identity() {
    let p = policy(&rule(
        "all",
        "sources = [\"any\"]\nsource_cidrs = [\"10.0.0.0/8\"]\nservices = [\"api\"]\naction = \"allow\"",
    ));
    assert_eq!(
        api(&p.evaluate(&who("u", &[]), ip("10.1.1.1"))),
        (Action::Allow, Some("all"))
    );
    assert_eq!(
        api(&p.evaluate_unauthenticated(ip("10.1.1.1"))),
        (Action::Allow, Some("all"))
    );
    assert_eq!(
        api(&p.evaluate_unauthenticated(ip("11.1.1.1"))),
        (Action::Drop, None)
    );
}

#[test]
fn known_user_needs_an_identity() {
    let p = policy(&rule(
        "k",
        "sources = [\"known-user\"]\nservices = [\"api\"]\naction = \"allow\"",
    ));
    assert_eq!(
        api(&p.evaluate(&who("anyone", &[]), ip("192.0.2.1"))),
        (Action::Allow, Some("k"))
    );
    assert_eq!(
        api(&p.evaluate_unauthenticated(ip("192.0.2.1"))),
        (Action::Drop, None)
    );
}

#[test]
fn user_group_and_scope_matchers() {
    let p = policy(&format!(
        "{}{}{}",
        rule(
            "u",
            "sources = [\"user:alice\"]\nservices = [\"api\"]\naction = \"allow\""
        ),
        rule(
            "g",
            "sources = [\"group:ops\", \"group:dev\"]\nservices = [\"api\"]\naction = \"allow\""
        ),
        rule(
            "s",
            "sources = [\"scope:api.write\"]\nservices = [\"api\"]\naction = \"allow\""
        ),
    ));
    let at = ip("192.0.2.1");
    assert_eq!(api(&p.evaluate(&who("alice", &[]), at)).1, Some("u"));
    // User names match exactly.
    assert_eq!(api(&p.evaluate(&who("Alice", &[]), at)).1, None);
    assert_eq!(api(&p.evaluate(&who("bob", &["dev"]), at)).1, Some("g"));
    assert_eq!(api(&p.evaluate(&who("bob", &["devs"]), at)).1, None);
    let mut scoped = who("carol", &[]);
    scoped.scopes = vec!["openid".into(), "api.write".into()];
    assert_eq!(api(&p.evaluate(&scoped, at)).1, Some("s"));
    scoped.scopes = vec!["api.read".into()];
    assert_eq!(api(&p.evaluate(&scoped, at)).1, None);
}

#[test]
fn claim_matchers_follow_paths_and_arrays() {
    let p = policy(&format!(
        "{}{}{}{}",
        rule(
            "roles",
            "sources = [\"claim:realm_access.roles=admin\"]\nservices = [\"api\"]\naction = \"allow\""
        ),
        rule(
            "dept",
            "sources = [\"claim:dept=sre\"]\nservices = [\"api\"]\naction = \"allow\""
        ),
        rule(
            "level",
            "sources = [\"claim:org.level=3\", \"claim:org.staff=true\"]\nservices = [\"api\"]\naction = \"allow\""
        ),
        rule(
            "ns",
            "sources = [\"claim:https://example.com/roles=ops\"]\nservices = [\"api\"]\naction = \"allow\""
        ),
    ));
    let at = ip("192.0.2.1");
    let with = |claims: serde_json::Value| {
        let mut id = who("u", &[]);
        id.claims = claims;
        api(&p.evaluate(&id, at)).1.map(str::to_owned)
    };
    assert_eq!(
        with(json!({"realm_access": {"roles": ["user", "admin"]}})).as_deref(),
        Some("roles")
    );
    assert_eq!(with(json!({"realm_access": {"roles": ["user"]}})), None);
    assert_eq!(with(json!({"realm_access": "admin"})), None);
    assert_eq!(with(json!({"dept": "sre"})).as_deref(), Some("dept"));
    assert_eq!(
        with(json!({"dept": ["web", "sre"]})).as_deref(),
        Some("dept")
    );
    assert_eq!(with(json!({"dept": "sres"})), None);
    assert_eq!(with(json!({"org": {"level": 3}})).as_deref(), Some("level"));
    assert_eq!(
        with(json!({"org": {"level": 4, "staff": true}})).as_deref(),
        Some("level")
    );
    assert_eq!(with(json!({"org": {"level": "4"}})), None);
    // A claim name containing dots (namespaced custom claims).
    assert_eq!(
        with(json!({"https://example.com/roles": ["ops"]})).as_deref(),
        Some("ns")
    );
    assert_eq!(with(json!(null)), None);
}

#[test]
fn claim_paths_prefer_the_longest_key() {
    let v = json!({"a.b": {"c": 1}, "a": {"b": {"c": 2}}});
    assert_eq!(claim_at(&v, "a.b.c"), Some(&json!(1)));
    assert_eq!(
        claim_at(&json!({"a": {"b": {"c": 2}}}), "a.b.c"),
        Some(&json!(2))
    );
    assert_eq!(claim_at(&json!({"a": {"b": 1}}), "a.c"), None);
}

#[test]
fn issuer_restricts_identity_rules() {
    let p = policy(&rule(
        "kc",
        &format!(
            "issuer = \"{KC}\"\nsources = [\"group:a\"]\nservices = [\"api\"]\naction = \"allow\""
        ),
    ));
    let mut id = who("u", &["a"]);
    assert_eq!(api(&p.evaluate(&id, ip("192.0.2.1"))).1, None);
    id.issuer = KC.into();
    assert_eq!(api(&p.evaluate(&id, ip("192.0.2.1"))).1, Some("kc"));
}

#[test]
fn issuer_with_any_source_means_any_identity_of_that_issuer() {
    let p = policy(&rule(
        "kc",
        &format!("issuer = \"{KC}\"\nservices = [\"api\"]\naction = \"allow\""),
    ));
    let mut id = who("u", &[]);
    id.issuer = KC.into();
    assert_eq!(api(&p.evaluate(&id, ip("192.0.2.1"))).1, Some("kc"));
    assert_eq!(api(&p.evaluate_unauthenticated(ip("192.0.2.1"))).1, None);
    // It needs an identity, so it never becomes a kernel entry.
    assert!(p.cidr_rules().is_empty());
}

#[test]
fn disabled_rules_are_skipped_and_keep_their_ids() {
    let p = policy(&format!(
        "{}{}",
        rule(
            "off",
            "enabled = false\nsources = [\"group:a\"]\nservices = [\"api\"]\naction = \"drop\""
        ),
        rule(
            "on",
            "sources = [\"group:a\"]\nservices = [\"api\"]\naction = \"allow\""
        ),
    ));
    let d = p.evaluate(&who("u", &["a"]), ip("192.0.2.1"));
    assert_eq!(api(&d), (Action::Allow, Some("on")));
    assert_eq!(d[0].rule_id(), 2);
    assert_eq!(p.rule(1).map(|r| r.name.as_str()), Some("off"));
}

#[test]
fn services_and_source_cidrs_combine() {
    let p = policy(&format!(
        "{}{}",
        rule(
            "api-office",
            "sources = [\"group:a\"]\nsource_cidrs = [\"10.0.0.0/8\", \"2001:db8::/32\"]\nservices = [\"api\"]\naction = \"allow\""
        ),
        rule(
            "dns-any",
            "sources = [\"group:a\"]\nservices = [\"dns\"]\naction = \"allow\""
        ),
    ));
    let a = who("u", &["a"]);
    let d = p.evaluate(&a, ip("10.9.8.7"));
    assert_eq!(
        summary(&d),
        vec![
            ("api".into(), Action::Allow, Some("api-office".into())),
            ("dns".into(), Action::Allow, Some("dns-any".into()))
        ]
    );
    assert_eq!(d[0].service_id.get(), 1);
    assert_eq!(d[1].service_id.get(), 2);
    let d = p.evaluate(&a, ip("192.0.2.1"));
    assert_eq!(summary(&d)[0], ("api".into(), Action::Drop, None));
    assert_eq!(summary(&d)[1].1, Action::Allow);
    assert_eq!(api(&p.evaluate(&a, ip("2001:db8::5"))).0, Action::Allow);
    // An IPv4-mapped IPv6 source is its IPv4 address.
    assert_eq!(api(&p.evaluate(&a, ip("::ffff:10.1.2.3"))).0, Action::Allow);
}

#[test]
fn lifetimes_are_capped_by_the_global_bound() {
    let p = policy(&format!(
        "{}{}{}",
        rule(
            "long",
            "sources = [\"group:long\"]\nservices = [\"api\"]\naction = \"allow\"\nmax_session_lifetime = \"2d\""
        ),
        rule(
            "short",
            "sources = [\"group:short\"]\nservices = [\"api\"]\naction = \"allow\"\nmax_session_lifetime = \"1h\"\nidle_timeout = \"10m\""
        ),
        rule(
            "plain",
            "sources = [\"group:plain\"]\nservices = [\"api\"]\naction = \"allow\""
        ),
    ));
    let at = ip("192.0.2.1");
    let get = |g: &str| p.evaluate(&who("u", &[g]), at).remove(0);
    assert_eq!(
        get("long").max_session_lifetime,
        Some(Duration::from_secs(12 * 3600))
    );
    let short = get("short");
    assert_eq!(short.max_session_lifetime, Some(Duration::from_secs(3600)));
    assert_eq!(short.idle_timeout, Some(Duration::from_secs(600)));
    assert!(short.needs_session);
    assert_eq!(
        get("plain").max_session_lifetime,
        Some(Duration::from_secs(12 * 3600))
    );
    assert_eq!(get("plain").idle_timeout, None);
    assert_eq!(p.max_session_lifetime(), Duration::from_secs(12 * 3600));
}

#[test]
fn static_allows_need_no_session() {
    let p = policy(&rule(
        "lb",
        "source_cidrs = [\"10.0.0.0/8\"]\nservices = [\"api\"]\naction = \"allow\"\nlog = false",
    ));
    let d = p.evaluate(&who("u", &[]), ip("10.0.0.1")).remove(0);
    assert_eq!(d.action, Action::Allow);
    assert!(!d.needs_session);
    assert_eq!(d.max_session_lifetime, None);
    assert!(!d.log);
}

// --- explain ----------------------------------------------------------------------------------

#[test]
fn explain_gives_the_reason_for_every_rule() {
    let p = policy(&format!(
        "{}{}{}{}{}{}{}{}",
        rule(
            "off",
            "enabled = false\nsources = [\"group:a\"]\nservices = [\"api\"]\naction = \"allow\""
        ),
        rule(
            "dns-only",
            "sources = [\"group:a\"]\nservices = [\"dns\"]\naction = \"allow\""
        ),
        rule(
            "office",
            "sources = [\"group:a\"]\nsource_cidrs = [\"10.0.0.0/8\"]\nservices = [\"api\"]\naction = \"allow\""
        ),
        rule(
            "kc-only",
            &format!(
                "issuer = \"{KC}\"\nsources = [\"group:a\"]\nservices = [\"api\"]\naction = \"allow\""
            )
        ),
        rule(
            "admins",
            "sources = [\"group:admins\", \"user:root\"]\nservices = [\"api\"]\naction = \"allow\""
        ),
        rule(
            "users",
            "sources = [\"group:a\"]\nservices = [\"api\"]\naction = \"allow\"\nmax_session_lifetime = \"4h\""
        ),
        rule(
            "later",
            "sources = [\"known-user\"]\nservices = [\"api\"]\naction = \"drop\""
        ),
        rule(
            "tail",
            "source_cidrs = [\"192.0.2.0/24\"]\nservices = [\"api\"]\naction = \"drop\""
        ),
    ));
    let e = p.explain(&who("alice", &["a"]), ip("192.0.2.1"));
    let api = &e.services[0];
    let results: Vec<(&str, RuleResult)> = api
        .rules
        .iter()
        .map(|r| (r.name.as_str(), r.result))
        .collect();
    assert_eq!(
        results,
        vec![
            ("off", RuleResult::Disabled),
            ("dns-only", RuleResult::ServiceNotInRule),
            ("office", RuleResult::SourceCidrMismatch),
            ("kc-only", RuleResult::IssuerMismatch),
            ("admins", RuleResult::NoMatchingSource),
            ("users", RuleResult::Matched),
            ("later", RuleResult::NotEvaluated),
            ("tail", RuleResult::NotEvaluated),
        ]
    );
    assert_eq!(api.rules[2].detail, "192.0.2.1 is not in 10.0.0.0/8");
    assert_eq!(
        api.rules[4].detail,
        "none of group:admins, user:root matches"
    );
    assert!(
        api.rules[5].detail.contains("by group:a"),
        "{}",
        api.rules[5].detail
    );
    assert_eq!(api.decision.rule_id(), 6);
    // The explanation's decisions are evaluate's.
    let decisions: Vec<_> = e.services.iter().map(|s| s.decision.clone()).collect();
    assert_eq!(
        decisions,
        p.evaluate(&who("alice", &["a"]), ip("192.0.2.1"))
    );
    // The dns service is decided by `dns-only`.
    assert_eq!(
        e.services[1].decision.rule.as_ref().unwrap().name,
        "dns-only"
    );

    let table = e.to_string();
    assert!(
        table.contains("user alice (issuer https://idp.example.com) from 192.0.2.1"),
        "{table}"
    );
    assert!(table.contains("service api (tcp/8000, unmatched traffic: reset): ALLOW by rule 6 `users`, session at most 4h"), "{table}");
    assert!(
        table.contains("source CIDR mismatch  192.0.2.1 is not in 10.0.0.0/8"),
        "{table}"
    );

    let v = serde_json::to_value(&e).unwrap();
    assert_eq!(
        v["services"][0]["rules"][2]["result"],
        "source-cidr-mismatch"
    );
    assert_eq!(v["services"][0]["decision"]["rule"]["name"], "users");
    assert_eq!(
        v["services"][0]["decision"]["max_session_lifetime"],
        4 * 3600
    );
    assert_eq!(v["services"][0]["decision"]["service_id"], 1);
    assert_eq!(v["identity"]["user"], "alice");

    // Without a token, identity rules say so and the static rule decides.
    let e = p.explain_unauthenticated(ip("192.0.2.1"));
    let api = &e.services[0];
    assert_eq!(api.rules[4].result, RuleResult::NoIdentity);
    assert_eq!(api.rules[7].result, RuleResult::Matched);
    assert_eq!(api.decision.rule_id(), 8);
    assert!(e.to_string().starts_with("no token, from 192.0.2.1"));
}

// --- static-CIDR compilation ------------------------------------------------------------------

/// (service id, net, action, rule id) of the compiled entries.
fn entries(p: &Policy) -> Vec<(u32, String, CidrAction, u32)> {
    p.cidr_rules()
        .into_iter()
        .map(|r| (r.service.get(), r.net.to_string(), r.action, r.rule_id))
        .collect()
}

const USERS_ALLOW: &str = "sources = [\"group:users\"]\nservices = [\"any\"]\naction = \"allow\"";

#[test]
fn static_rules_before_identity_rules_become_kernel_entries() {
    let p = policy(&format!(
        "{}{}{}",
        rule(
            "lb",
            "source_cidrs = [\"10.20.0.0/24\"]\nservices = [\"api\"]\naction = \"allow\""
        ),
        rule(
            "banned",
            "source_cidrs = [\"203.0.113.0/24\"]\nservices = [\"any\"]\naction = \"drop\""
        ),
        rule("users", USERS_ALLOW),
    ));
    assert_eq!(
        entries(&p),
        vec![
            (1, "10.20.0.0/24".into(), CidrAction::Allow, 1),
            (1, "203.0.113.0/24".into(), CidrAction::Deny, 2),
            (2, "203.0.113.0/24".into(), CidrAction::Deny, 2),
        ]
    );
}

#[test]
fn a_static_rule_without_networks_covers_both_families() {
    let p = policy(&format!(
        "{}{}",
        rule("closed", "services = [\"dns\"]\naction = \"drop\""),
        rule("users", USERS_ALLOW)
    ));
    assert_eq!(
        entries(&p),
        vec![
            (2, "0.0.0.0/0".into(), CidrAction::Deny, 1),
            (2, "::/0".into(), CidrAction::Deny, 1),
        ]
    );
}

#[test]
fn a_static_drop_after_an_overlapping_allow_is_left_to_token_time() {
    let rules = format!(
        "{}{}",
        rule("users", USERS_ALLOW),
        rule(
            "banned",
            "source_cidrs = [\"203.0.113.0/24\"]\nservices = [\"api\"]\naction = \"drop\""
        ),
    );
    let p = policy(&rules);
    assert!(entries(&p).is_empty(), "{:?}", entries(&p));
    // First match: a user from the banned range is let in (the earlier rule decides) ...
    assert_eq!(
        api(&p.evaluate(&who("u", &["users"]), ip("203.0.113.5"))).0,
        Action::Allow
    );
    // ... anyone else from there is refused by `banned` when they present a token.
    assert_eq!(
        api(&p.evaluate(&who("u", &["guests"]), ip("203.0.113.5"))),
        (Action::Drop, Some("banned"))
    );
    let w = warnings(&rules);
    let msg = &w
        .iter()
        .find(|d| d.path == "policy.rules[1]")
        .expect("a warning for `banned`")
        .message;
    assert!(
        msg.contains("is not a kernel deny entry for `api` from 203.0.113.0/24"),
        "{msg}"
    );
    assert!(msg.contains("earlier rule `users` can allow"), "{msg}");
    // `api` answers with RST, so the rule's "drop" differs for traffic without a session.
    assert!(
        msg.contains("(a RST from `api`, not a silent drop)"),
        "{msg}"
    );
}

#[test]
fn an_identity_allow_elsewhere_does_not_block_a_deny_entry() {
    // The identity rule covers other networks, or another service: no overlap, so the deny is
    // compiled.
    let p = policy(&format!(
        "{}{}{}",
        rule(
            "office-users",
            "sources = [\"group:users\"]\nsource_cidrs = [\"10.0.0.0/8\"]\nservices = [\"api\"]\naction = \"allow\""
        ),
        rule(
            "dns-users",
            "sources = [\"group:users\"]\nservices = [\"dns\"]\naction = \"allow\""
        ),
        rule(
            "banned",
            "source_cidrs = [\"203.0.113.0/24\"]\nservices = [\"api\"]\naction = \"drop\""
        ),
    ));
    assert_eq!(
        entries(&p),
        vec![(1, "203.0.113.0/24".into(), CidrAction::Deny, 3)]
    );
}

#[test]
fn a_static_allow_after_a_compiled_deny_is_compiled_too() {
    // The kernel checks denies first, so the earlier deny still wins where they overlap.
    let p = policy(&format!(
        "{}{}{}",
        rule(
            "banned",
            "source_cidrs = [\"10.6.6.0/24\"]\nservices = [\"api\"]\naction = \"drop\""
        ),
        rule(
            "office",
            "source_cidrs = [\"10.0.0.0/8\"]\nservices = [\"api\"]\naction = \"allow\""
        ),
        rule("users", USERS_ALLOW),
    ));
    assert_eq!(
        entries(&p),
        vec![
            (1, "10.6.6.0/24".into(), CidrAction::Deny, 1),
            (1, "10.0.0.0/8".into(), CidrAction::Allow, 2),
        ]
    );
}

#[test]
fn a_static_allow_after_a_deny_left_to_token_time_is_refused() {
    let head = format!(
        "{}{}",
        rule("users", USERS_ALLOW),
        rule(
            "banned",
            "source_cidrs = [\"10.0.0.0/8\"]\nservices = [\"api\"]\naction = \"drop\""
        ),
    );
    // `banned` is no kernel entry (users may come from there), so a kernel allow for a network
    // overlapping it would let non-users from 10/8 through.
    let err = parse(&format!(
        "{head}{}",
        rule(
            "world",
            "source_cidrs = [\"0.0.0.0/0\"]\nservices = [\"api\"]\naction = \"allow\""
        ),
    ))
    .unwrap_err();
    let msg = &err
        .0
        .iter()
        .find(|d| d.path == "policy.rules[2]")
        .expect("an error for `world`")
        .message;
    assert!(
        msg.contains("rule `world` allows `api` from 0.0.0.0/0 without a token"),
        "{msg}"
    );
    assert!(
        msg.contains("earlier rule `banned` (drop) could not become a kernel deny entry"),
        "{msg}"
    );
    // Inside `banned` (never reached) or away from it, a later static allow is fine.
    let p = policy(&format!(
        "{head}{}",
        rule(
            "lb",
            "source_cidrs = [\"10.20.0.0/16\", \"192.0.2.0/24\"]\nservices = [\"api\"]\naction = \"allow\""
        ),
    ));
    assert_eq!(
        entries(&p),
        vec![(1, "192.0.2.0/24".into(), CidrAction::Allow, 3)]
    );
}

#[test]
fn entries_inside_an_earlier_static_network_are_not_written() {
    let rules = format!(
        "{}{}{}",
        rule(
            "banned",
            "source_cidrs = [\"10.0.0.0/8\"]\nservices = [\"api\"]\naction = \"drop\""
        ),
        rule(
            "lb",
            "source_cidrs = [\"10.20.0.0/16\"]\nservices = [\"api\"]\naction = \"allow\""
        ),
        rule("users", USERS_ALLOW),
    );
    assert_eq!(
        entries(&policy(&rules)),
        vec![(1, "10.0.0.0/8".into(), CidrAction::Deny, 1)]
    );
    let w = warnings(&rules);
    assert!(
        w.iter().any(|d| d.path == "policy.rules[1]"
            && d.message.contains("can never match: earlier rule `banned`")),
        "{w:?}"
    );
}

#[test]
fn a_compiled_reset_rule_warns_that_it_drops() {
    let rules = format!(
        "{}{}",
        rule(
            "banned",
            "source_cidrs = [\"203.0.113.0/24\"]\nservices = [\"api\"]\naction = \"reset\""
        ),
        rule("users", USERS_ALLOW),
    );
    assert_eq!(
        entries(&policy(&rules)),
        vec![(1, "203.0.113.0/24".into(), CidrAction::Deny, 1)]
    );
    let w = warnings(&rules);
    assert!(
        w.iter()
            .any(|d| d.path == "policy.rules[0]" && d.message.contains("drop silently")),
        "{w:?}"
    );
}

#[test]
fn disabled_static_rules_compile_to_nothing() {
    let p = policy(&format!(
        "{}{}",
        rule(
            "lb",
            "enabled = false\nsource_cidrs = [\"10.20.0.0/24\"]\nservices = [\"api\"]\naction = \"allow\""
        ),
        rule("users", USERS_ALLOW),
    ));
    assert!(entries(&p).is_empty());
}

/// A tiny deterministic generator, so the property test needs no extra dependency.
struct Lcg(u64);

impl Lcg {
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        &items[((self.0 >> 33) as usize) % items.len()]
    }
}

/// For random policies that validate, the kernel's order (CIDR deny, CIDR allow, session,
/// service action) over the compiled entries and the sessions `evaluate` asks for lets through
/// exactly what first-match evaluation allows: for every source, identity (or none) and service.
#[test]
fn compiled_entries_and_sessions_agree_with_first_match() {
    let kinds = [
        "",
        "sources = [\"group:a\"]\n",
        "sources = [\"group:b\"]\n",
        "sources = [\"known-user\"]\n",
    ];
    let nets = [
        "",
        "source_cidrs = [\"10.0.0.0/8\"]\n",
        "source_cidrs = [\"10.1.0.0/16\"]\n",
        "source_cidrs = [\"10.1.2.0/24\", \"2001:db8::/32\"]\n",
        "source_cidrs = [\"192.168.0.0/16\"]\n",
    ];
    let services = [
        "services = [\"any\"]\n",
        "services = [\"api\"]\n",
        "services = [\"dns\"]\n",
    ];
    let actions = [
        "action = \"allow\"\n",
        "action = \"drop\"\n",
        "action = \"reset\"\n",
    ];
    let sources = [
        "10.1.2.3",
        "10.1.9.9",
        "10.9.9.9",
        "192.168.1.1",
        "172.16.0.1",
        "2001:db8::1",
        "2001:db9::1",
    ];
    let identities: Vec<Option<Identity>> = vec![
        None,
        Some(who("u", &[])),
        Some(who("u", &["a"])),
        Some(who("u", &["b"])),
        Some(who("u", &["a", "b"])),
    ];
    let mut rng = Lcg(7);
    let (mut accepted, mut refused, mut deny_entries, mut allow_entries) = (0, 0, 0, 0);
    for case in 0..400 {
        let n = 1 + case % 5;
        let mut rules = String::new();
        for i in 0..n {
            rules.push_str(&format!(
                "[[policy.rules]]\nname = \"r{i}\"\n{}{}{}{}",
                rng.pick(&kinds),
                rng.pick(&nets),
                rng.pick(&services),
                rng.pick(&actions)
            ));
        }
        let Ok((config, _)) = parse(&rules) else {
            refused += 1;
            continue;
        };
        accepted += 1;
        let p = config.policy();
        let compiled = p.cidr_rules();
        // The data plane refuses the same network twice for a service and action.
        let mut keys: Vec<_> = compiled
            .iter()
            .map(|e| (e.service, e.net, e.action == CidrAction::Allow))
            .collect();
        keys.sort();
        keys.dedup();
        assert_eq!(
            keys.len(),
            compiled.len(),
            "case {case}: duplicate entries {compiled:?}"
        );
        deny_entries += compiled
            .iter()
            .filter(|e| e.action == CidrAction::Deny)
            .count();
        allow_entries += compiled
            .iter()
            .filter(|e| e.action == CidrAction::Allow)
            .count();
        for s in sources {
            let addr = ip(s);
            for id in &identities {
                let decisions = match id {
                    Some(id) => p.evaluate(id, addr),
                    None => p.evaluate_unauthenticated(addr),
                };
                for d in &decisions {
                    let hit = |action| {
                        compiled.iter().any(|e| {
                            e.service == d.service_id && e.action == action && e.net.contains(&addr)
                        })
                    };
                    let kernel_passes =
                        !hit(CidrAction::Deny) && (hit(CidrAction::Allow) || d.needs_session);
                    assert_eq!(
                        kernel_passes,
                        d.action == Action::Allow,
                        "case {case}: {rules}\nsource {s}, identity {id:?}, service {}: decision {d:?}, entries {compiled:?}",
                        d.service
                    );
                }
                if let Some(id) = id {
                    let explained: Vec<_> = p
                        .explain(id, addr)
                        .services
                        .into_iter()
                        .map(|s| s.decision)
                        .collect();
                    assert_eq!(explained, decisions);
                }
            }
        }
    }
    // The generator must exercise both outcomes and both kinds of entries.
    assert!(
        accepted > 100 && refused > 10,
        "accepted {accepted}, refused {refused}"
    );
    assert!(
        deny_entries > 50 && allow_entries > 50,
        "deny {deny_entries}, allow {allow_entries}"
    );
}
