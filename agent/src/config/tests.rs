use std::{net::SocketAddr, path::PathBuf, time::Duration};

use super::*;
use crate::{
    dataplane::{AttachMode, CidrAction, Protocol, ServiceAction, ServiceId},
    policy::{Action, ServiceSelector, SourceMatcher},
};

/// A valid configuration without rules; tests append `[[policy.rules]]` or change lines.
const BASE: &str = r#"
[dataplane]
interfaces = [{ name = "eth0" }]

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

/// One identity allow rule for both services, so that a config built on it has no warnings.
const ALLOW_ALL_USERS: &str = r#"
[[policy.rules]]
name = "users"
sources = ["known-user"]
services = ["any"]
action = "allow"
"#;

fn ok(src: &str) -> (Config, Vec<Diagnostic>) {
    match Config::parse(src) {
        Ok(x) => x,
        Err(e) => panic!("expected a valid configuration, got {e}"),
    }
}

fn errors(src: &str) -> Vec<Diagnostic> {
    match Config::parse(src) {
        Ok(_) => panic!("expected errors, the configuration was accepted"),
        Err(e) => e.0,
    }
}

fn has(list: &[Diagnostic], path: &str, text: &str) -> bool {
    list.iter()
        .any(|d| d.path == path && d.message.contains(text))
}

#[track_caller]
fn assert_has(list: &[Diagnostic], path: &str, text: &str) {
    assert!(
        has(list, path, text),
        "no diagnostic at {path} containing {text:?} in:\n{}",
        list.iter().map(|d| format!("  {d}\n")).collect::<String>()
    );
}

fn replace(src: &str, from: &str, to: &str) -> String {
    assert!(src.contains(from), "{from:?} not in the base configuration");
    src.replacen(from, to, 1)
}

#[test]
fn example_file_parses_and_validates_cleanly() {
    let src = include_str!("../../idgate.example.toml");
    let (config, warnings) = ok(src);
    assert!(warnings.is_empty(), "warnings: {warnings:?}");
    assert_eq!(config.services.len(), 1);
    assert_eq!(config.services[0].port, 8000);
    assert_eq!(config.services[0].action, ServiceAction::Reset);
    assert_eq!(config.issuers.len(), 2);
    let kc = &config.issuers[1];
    assert_eq!(kc.user_claim, "preferred_username");
    assert_eq!(kc.group_claims[0].path, "realm_access.roles");
    assert_eq!(kc.group_claims[1].format, GroupClaimFormat::Array);
    assert_eq!(config.policy.default, Action::Drop);
    assert_eq!(
        config.admin.metrics,
        Some("127.0.0.1:9464".parse().unwrap())
    );
    // The health-check allow and the banned deny are kernel entries; the identity rules are not.
    let id = ServiceId::new(1).unwrap();
    let entries: Vec<_> = config
        .cidr_rules()
        .into_iter()
        .map(|r| (r.service, r.net.to_string(), r.action, r.rule_id))
        .collect();
    assert_eq!(
        entries,
        vec![
            (id, "10.20.0.0/24".into(), CidrAction::Allow, 1),
            (id, "203.0.113.0/24".into(), CidrAction::Deny, 2),
            (id, "2001:db8:bad::/48".into(), CidrAction::Deny, 2),
        ]
    );
}

#[test]
fn defaults_fill_what_is_left_out() {
    let src = format!("{BASE}{ALLOW_ALL_USERS}");
    let (c, warnings) = ok(&src);
    assert!(warnings.is_empty(), "warnings: {warnings:?}");
    assert_eq!(c.dataplane.interfaces[0].mode, AttachMode::Auto);
    assert_eq!(c.dataplane.max_sessions, 65_536);
    assert_eq!(
        c.dataplane.max_session_lifetime,
        Duration::from_secs(12 * 3600)
    );
    assert_eq!(
        (c.dataplane.events_per_sec, c.dataplane.events_burst),
        (200, 400)
    );
    assert_eq!(
        c.dataplane.session_state.as_deref(),
        Some(std::path::Path::new("/run/idgate/sessions.jsonl")),
        "pins are kept by default, so are their owners"
    );
    assert_eq!(c.services[1].action, ServiceAction::Drop);
    let i = &c.issuers[0];
    assert_eq!(i.algorithms, vec!["RS256".to_owned()]);
    assert_eq!(i.leeway, Duration::from_secs(60));
    assert!(!i.require_typ_at_jwt);
    assert_eq!(i.max_token_bytes, 16_384);
    assert_eq!(i.user_claim, "sub");
    assert!(i.group_claims.is_empty());
    assert_eq!(i.jwks_refresh, Duration::from_secs(900));
    assert_eq!(i.ca_file, None);
    assert!(!i.allow_http);
    let ep = &c.session_endpoint;
    assert!(ep.trusted_proxies.is_empty());
    assert_eq!(
        (ep.failed_attempts_per_minute, ep.failed_attempts_burst),
        (10, 20)
    );
    assert_eq!(c.admin.socket, PathBuf::from("/run/idgate/admin.sock"));
    assert_eq!(
        c.admin.whois_socket,
        Some(PathBuf::from("/run/idgate/whois.sock"))
    );
    assert_eq!(c.admin.metrics, None);
    let r = &c.policy.rules[0];
    assert!(r.enabled && r.log);
    assert_eq!(r.description, None);
    assert_eq!(r.issuer, None);
    assert!(r.source_cidrs.is_empty());
    assert_eq!(r.max_session_lifetime, None);
    // Absent sources mean "any": a rule with no identity condition.
    let src = format!(
        "{BASE}[[policy.rules]]\nname = \"lb\"\nsource_cidrs = [\"10.0.0.0/8\"]\n\
         services = [\"any\"]\naction = \"allow\"\n"
    );
    let (c, _) = ok(&src);
    assert_eq!(c.policy.rules[0].sources, vec![SourceMatcher::Any]);
    assert_eq!(c.policy.rules[0].services, ServiceSelector::Any);
    assert!(c.policy.rules[0].is_static());
}

#[test]
fn the_whois_socket_sits_beside_the_admin_socket_unless_set() {
    let with = |admin: &str| format!("{BASE}{ALLOW_ALL_USERS}\n[admin]\n{admin}\n");
    let moved = ok(&with("socket = \"/run/x/admin.sock\"")).0;
    assert_eq!(
        moved.admin.whois_socket,
        Some(PathBuf::from("/run/x/whois.sock"))
    );
    let off = ok(&with("whois_socket = \"\"")).0;
    assert_eq!(off.admin.whois_socket, None);
    let same = with("socket = \"/run/x/a.sock\"\nwhois_socket = \"/run/x/a.sock\"");
    assert_has(
        &errors(&same),
        "admin.whois_socket",
        "must not be the admin socket",
    );
    let relative = with("whois_socket = \"whois.sock\"");
    assert_has(&errors(&relative), "admin.whois_socket", "absolute path");
}

#[test]
fn session_state_follows_the_pins_unless_set() {
    let unpinned = replace(
        &format!("{BASE}{ALLOW_ALL_USERS}"),
        "[dataplane]\n",
        "[dataplane]\npin_dir = \"\"\n",
    );
    assert_eq!(
        ok(&unpinned).0.dataplane.session_state,
        None,
        "nothing survives"
    );
    let elsewhere = replace(
        &format!("{BASE}{ALLOW_ALL_USERS}"),
        "[dataplane]\n",
        "[dataplane]\nsession_state = \"/var/lib/idgate/s.jsonl\"\n",
    );
    assert_eq!(
        ok(&elsewhere).0.dataplane.session_state.as_deref(),
        Some(std::path::Path::new("/var/lib/idgate/s.jsonl"))
    );
    let off = replace(&elsewhere, "/var/lib/idgate/s.jsonl", "");
    assert_eq!(ok(&off).0.dataplane.session_state, None);
    let relative = replace(&elsewhere, "/var/lib/idgate/s.jsonl", "s.jsonl");
    assert_has(
        &errors(&relative),
        "dataplane.session_state",
        "absolute path",
    );
}

#[test]
fn unknown_keys_are_errors_with_their_path_and_position() {
    let src = format!("{BASE}{ALLOW_ALL_USERS}");
    let src = replace(&src, "interfaces = [", "colour = \"red\"\ninterfaces = [");
    let src = replace(
        &src,
        "action = \"allow\"",
        "action = \"allow\"\nsrcs = [\"any\"]",
    );
    let src = format!("{src}\n[extra]\nx = 1\n");
    let errs = errors(&src);
    assert_has(
        &errs,
        "dataplane.colour",
        "unknown key `colour` in `dataplane`",
    );
    assert_has(
        &errs,
        "dataplane.colour",
        "expected one of: events_burst, events_per_sec, interfaces",
    );
    assert_has(&errs, "policy.rules[0].srcs", "unknown key `srcs`");
    assert_has(&errs, "extra", "unknown key `extra` at the top level");
    // Positions are 1-based line:column of the key.
    let colour = errs.iter().find(|d| d.path == "dataplane.colour").unwrap();
    let line = src.lines().position(|l| l.starts_with("colour")).unwrap() + 1;
    assert_eq!((colour.line, colour.column), (Some(line), Some(1)));
    assert!(
        colour
            .to_string()
            .starts_with(&format!("{line}:1: dataplane.colour: "))
    );
}

#[test]
fn every_error_is_reported_at_once() {
    let src = format!("{BASE}{ALLOW_ALL_USERS}");
    let src = replace(&src, "port = 8000", "port = 70000");
    let src = replace(&src, "name = \"dns\"", "name = \"api\"");
    let src = replace(&src, "audiences = [\"idgate\"]", "audiences = []");
    let src = replace(&src, "services = [\"any\"]", "services = [\"ftp\"]");
    let src = replace(
        &src,
        "[dataplane]\n",
        "[dataplane]\nmax_session_lifetime = 3600\n",
    );
    let src = replace(&src, "listen = \"0.0.0.0:8443\"", "listen = \"0.0.0.0\"");
    let errs = errors(&src);
    assert_has(
        &errs,
        "services[0].port",
        "expected an integer in 1..=65535, found 70000",
    );
    assert_has(
        &errs,
        "services[1].name",
        "service name \"api\" is used twice",
    );
    assert_has(&errs, "issuers[0].audiences", "at least one audience");
    assert_has(
        &errs,
        "policy.rules[0].services[0]",
        "unknown service \"ftp\"",
    );
    assert_has(&errs, "dataplane.max_session_lifetime", "expected a string");
    assert_has(
        &errs,
        "session_endpoint.listen",
        "expected an address and port",
    );
    assert!(errs.len() >= 6, "{errs:?}");
    // Listed in file order, and the Display shows them all.
    let lines: Vec<_> = errs.iter().map(|d| d.line.unwrap()).collect();
    assert!(lines.windows(2).all(|w| w[0] <= w[1]), "{lines:?}");
    let shown = ConfigErrors(errs.clone()).to_string();
    assert!(shown.starts_with(&format!("{} configuration errors:", errs.len())));
    assert_eq!(shown.lines().count(), errs.len() + 1);
}

#[test]
fn syntax_errors_have_positions_and_stop_validation() {
    let errs = errors("[dataplane]\ninterfaces = [\n[[services]]\nname = \n");
    assert!(!errs.is_empty());
    assert!(errs.iter().all(|d| d.line.is_some()), "{errs:?}");
    // No semantic noise ("missing key `policy`") from a document the parser had to guess at.
    assert!(
        !errs.iter().any(|d| d.message.contains("missing key")),
        "{errs:?}"
    );
}

#[test]
fn missing_sections_and_keys_say_what_is_expected() {
    let errs = errors("[dataplane]\ninterfaces = []\n");
    assert_has(&errs, "dataplane.interfaces", "at least one interface");
    assert_has(&errs, "services", "missing key `services`");
    assert_has(&errs, "issuers", "missing key `issuers`");
    assert_has(&errs, "session_endpoint", "missing key `session_endpoint`");
    assert_has(&errs, "policy", "missing key `policy`");
}

#[test]
fn empty_service_and_issuer_lists_are_refused() {
    let src = "services = []\nissuers = []\n[dataplane]\ninterfaces = [{ name = \"eth0\" }]\n\
               [session_endpoint]\nlisten = \"127.0.0.1:8443\"\n[policy]\ndefault = \"drop\"\n";
    let errs = errors(src);
    assert_has(&errs, "services", "nothing is protected");
    assert_has(&errs, "issuers", "no token can be verified");
    assert_eq!(errs.len(), 2, "{errs:?}");
}

#[test]
fn protecting_the_session_endpoint_port_is_refused() {
    let src = replace(
        &format!("{BASE}{ALLOW_ALL_USERS}"),
        "port = 8000",
        "port = 8443",
    );
    let errs = errors(&src);
    assert_has(&errs, "services[0].port", "the session endpoint's own port");
    // The same port over UDP does not lock anyone out.
    let src = replace(
        &format!("{BASE}{ALLOW_ALL_USERS}"),
        "port = 53",
        "port = 8443",
    );
    ok(&src);
}

#[test]
fn rules_naming_unknown_services_or_issuers_are_refused() {
    let src = format!(
        "{BASE}[[policy.rules]]\nname = \"r\"\nissuer = \"https://other.example.com\"\n\
         sources = [\"known-user\"]\nservices = [\"api\", \"ssh\"]\naction = \"allow\"\n"
    );
    let errs = errors(&src);
    assert_has(
        &errs,
        "policy.rules[0].issuer",
        "unknown issuer \"https://other.example.com\"",
    );
    assert_has(
        &errs,
        "policy.rules[0].services[1]",
        "unknown service \"ssh\"",
    );
}

#[test]
fn a_broken_service_is_not_also_reported_as_unknown() {
    let src = replace(&format!("{BASE}{ALLOW_ALL_USERS}"), "port = 53", "port = 0");
    let src = replace(&src, "services = [\"any\"]", "services = [\"dns\"]");
    let errs = errors(&src);
    assert_has(&errs, "services[1].port", "1..=65535");
    assert!(
        !errs.iter().any(|d| d.message.contains("unknown service")),
        "{errs:?}"
    );
}

#[test]
fn duplicate_rule_names_are_refused() {
    let src = format!("{BASE}{ALLOW_ALL_USERS}{ALLOW_ALL_USERS}");
    assert_has(
        &errors(&src),
        "policy.rules[1].name",
        "rule name \"users\" is used twice",
    );
}

#[test]
fn rules_that_can_never_match_are_refused() {
    let src = format!(
        "{BASE}[[policy.rules]]\nname = \"a\"\nservices = []\naction = \"allow\"\n\
         [[policy.rules]]\nname = \"b\"\nsources = []\nservices = [\"api\"]\naction = \"allow\"\n"
    );
    let errs = errors(&src);
    assert_has(
        &errs,
        "policy.rules[0].services",
        "empty services list can never match",
    );
    assert_has(
        &errs,
        "policy.rules[1].sources",
        "empty sources list can never match",
    );
}

#[test]
fn mixing_any_with_names_is_refused() {
    let src = format!(
        "{BASE}[[policy.rules]]\nname = \"a\"\nsources = [\"any\", \"group:x\"]\n\
         services = [\"any\", \"api\"]\naction = \"allow\"\n"
    );
    let errs = errors(&src);
    assert_has(
        &errs,
        "policy.rules[0].sources",
        "\"any\" cannot be combined",
    );
    assert_has(
        &errs,
        "policy.rules[0].services",
        "\"any\" cannot be combined",
    );
}

#[test]
fn bad_source_matchers_are_refused() {
    let src = format!(
        "{BASE}[[policy.rules]]\nname = \"a\"\n\
         sources = [\"group:\", \"claim:roles\", \"team:x\", \"claim:a..b=1\"]\n\
         services = [\"api\"]\naction = \"allow\"\n"
    );
    let errs = errors(&src);
    assert_has(&errs, "policy.rules[0].sources[0]", "needs a name");
    assert_has(
        &errs,
        "policy.rules[0].sources[1]",
        "claim:<dotted.path>=<value>",
    );
    assert_has(
        &errs,
        "policy.rules[0].sources[2]",
        "unknown source \"team:x\"",
    );
    assert_has(&errs, "policy.rules[0].sources[3]", "single dots");
}

#[test]
fn metrics_must_be_on_loopback() {
    let src = format!("{BASE}{ALLOW_ALL_USERS}\n[admin]\nmetrics = \"0.0.0.0:9464\"\n");
    assert_has(&errors(&src), "admin.metrics", "must listen on loopback");
    let src = format!("{BASE}{ALLOW_ALL_USERS}\n[admin]\nmetrics = \"[::1]:9464\"\n");
    let (c, _) = ok(&src);
    assert_eq!(
        c.admin.metrics,
        Some("[::1]:9464".parse::<SocketAddr>().unwrap())
    );
    let src = format!("{BASE}{ALLOW_ALL_USERS}\n[admin]\nsocket = \"admin.sock\"\n");
    assert_has(&errors(&src), "admin.socket", "absolute path");
}

#[test]
fn audit_output_is_stdout_file_or_journald() {
    let (c, _) = ok(&format!("{BASE}{ALLOW_ALL_USERS}"));
    assert_eq!(c.audit, AuditConfig::Stdout);
    let with = |audit: &str| format!("{BASE}{ALLOW_ALL_USERS}\n[audit]\n{audit}\n");
    let (c, _) = ok(&with(
        "output = \"file\"\npath = \"/var/log/idgate/audit.jsonl\"",
    ));
    assert_eq!(
        c.audit,
        AuditConfig::File(PathBuf::from("/var/log/idgate/audit.jsonl"))
    );
    let (c, _) = ok(&with("output = \"journald\""));
    assert_eq!(c.audit, AuditConfig::Journald);
    assert_has(
        &errors(&with("output = \"file\"")),
        "audit.path",
        "needs a path",
    );
    assert_has(
        &errors(&with("output = \"stdout\"\npath = \"/tmp/x\"")),
        "audit.path",
        "only for output = \"file\"",
    );
    assert_has(
        &errors(&with("output = \"file\"\npath = \"audit.jsonl\"")),
        "audit.path",
        "absolute path",
    );
    assert_has(
        &errors(&with("output = \"syslog\"")),
        "audit.output",
        "expected one of",
    );
    assert_has(&errors(&with("format = \"json\"")), "audit.format", "");
}

#[test]
fn the_default_action_must_be_explicit_and_not_allow() {
    let src = replace(
        &format!("{BASE}{ALLOW_ALL_USERS}"),
        "default = \"drop\"\n",
        "",
    );
    assert_has(&errors(&src), "policy.default", "missing key `default`");
    let src = replace(
        &format!("{BASE}{ALLOW_ALL_USERS}"),
        "default = \"drop\"",
        "default = \"allow\"",
    );
    assert_has(&errors(&src), "policy.default", "enforce nothing");
    let src = replace(
        &format!("{BASE}{ALLOW_ALL_USERS}"),
        "default = \"drop\"",
        "default = \"reset\"",
    );
    assert_eq!(ok(&src).0.policy.default, Action::Reset);
}

#[test]
fn unsafe_or_unknown_algorithms_are_refused() {
    let src = replace(
        &format!("{BASE}{ALLOW_ALL_USERS}"),
        "audiences = [\"idgate\"]",
        "audiences = [\"idgate\"]\nalgorithms = [\"none\", \"HS256\", \"RS999\", \"ES256\"]",
    );
    let errs = errors(&src);
    assert_has(&errs, "issuers[0].algorithms[0]", "\"none\" is refused");
    assert_has(&errs, "issuers[0].algorithms[1]", "\"HS256\" is refused");
    assert_has(
        &errs,
        "issuers[0].algorithms[2]",
        "unknown algorithm \"RS999\"",
    );
    assert!(!has(&errs, "issuers[0].algorithms[3]", ""));
}

#[test]
fn plain_http_issuers_only_on_loopback_with_allow_http() {
    let base = format!("{BASE}{ALLOW_ALL_USERS}");
    let http = |url: &str, allow: bool| {
        replace(
            &base,
            "issuer = \"https://idp.example.com\"",
            &format!("issuer = \"{url}\"\nallow_http = {allow}"),
        )
    };
    assert_has(
        &errors(&http("http://idp.example.com", true)),
        "issuers[0].issuer",
        "only accepted for a loopback issuer",
    );
    assert_has(
        &errors(&http("http://127.0.0.1:8080", false)),
        "issuers[0].issuer",
        "expected an https:// URL",
    );
    let (c, warnings) = ok(&http("http://127.0.0.1:8080/realms/test", true));
    assert!(c.issuers[0].allow_http);
    assert!(warnings.is_empty());
    // The verifier trusts only address literals to be local: a name could resolve anywhere.
    assert_has(
        &errors(&http("http://localhost:8080", true)),
        "issuers[0].issuer",
        "only accepted for a loopback issuer",
    );
    let (_, warnings) = ok(&http("https://idp.example.com", true));
    assert_has(&warnings, "issuers[0].allow_http", "no effect");
    assert_has(
        &errors(&http("https://idp.example.com/?x=1", false)),
        "issuers[0].issuer",
        "no query",
    );
}

#[test]
fn issuers_must_be_unique_and_have_an_audience() {
    let src = replace(
        &format!("{BASE}{ALLOW_ALL_USERS}"),
        "issuer = \"https://kc.example.com/realms/corp\"",
        "issuer = \"https://idp.example.com\"",
    );
    assert_has(&errors(&src), "issuers[1].issuer", "configured twice");
    let src = replace(
        &format!("{BASE}{ALLOW_ALL_USERS}"),
        "audiences = [\"idgate\"]\n",
        "",
    );
    assert_has(
        &errors(&src),
        "issuers[0].audiences",
        "missing key `audiences`",
    );
}

#[test]
fn services_must_not_share_a_port() {
    let src = replace(
        &format!("{BASE}{ALLOW_ALL_USERS}"),
        "protocol = \"udp\"\nport = 53",
        "protocol = \"tcp\"\nport = 8000",
    );
    assert_has(
        &errors(&src),
        "services[1].port",
        "8000/tcp is already protected by service \"api\"",
    );
}

#[test]
fn tls_is_required_off_loopback() {
    let no_tls = replace(
        &format!("{BASE}{ALLOW_ALL_USERS}"),
        "tls_cert = \"/etc/idgate/cert.pem\"\ntls_key = \"/etc/idgate/key.pem\"\n",
        "",
    );
    assert_has(&errors(&no_tls), "session_endpoint.tls_cert", "in clear");
    let local = replace(&no_tls, "0.0.0.0:8443", "127.0.0.1:8443");
    assert_eq!(ok(&local).0.session_endpoint.tls, None);
    let half = replace(
        &format!("{BASE}{ALLOW_ALL_USERS}"),
        "tls_key = \"/etc/idgate/key.pem\"\n",
        "",
    );
    assert_has(&errors(&half), "session_endpoint.tls_key", "go together");
}

#[test]
fn cidrs_are_checked_and_normalised() {
    let rule = |cidrs: &str| {
        format!(
            "{BASE}{ALLOW_ALL_USERS}[[policy.rules]]\nname = \"lb\"\nsource_cidrs = [{cidrs}]\n\
             services = [\"api\"]\naction = \"drop\"\n"
        )
    };
    let errs = errors(&rule("\"10.1.2.3/8\", \"nonsense\""));
    assert_has(
        &errs,
        "policy.rules[1].source_cidrs[0]",
        "did you mean \"10.0.0.0/8\"",
    );
    assert_has(
        &errs,
        "policy.rules[1].source_cidrs[1]",
        "expected a network",
    );
    let (c, _) = ok(&rule("\"::ffff:192.0.2.0/120\", \"198.51.100.7\""));
    let nets: Vec<String> = c.policy.rules[1]
        .source_cidrs
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(nets, ["192.0.2.0/24", "198.51.100.7/32"]);
}

#[test]
fn out_of_range_numbers_and_durations_are_refused() {
    let src = replace(
        &format!("{BASE}{ALLOW_ALL_USERS}"),
        "interfaces = [{ name = \"eth0\" }]",
        "interfaces = [{ name = \"eth0\", mode = \"fast\" }, { name = \"a/b\" }]\nmax_sessions = 0\n\
         max_session_lifetime = \"30s\"",
    );
    let errs = errors(&src);
    assert_has(
        &errs,
        "dataplane.interfaces[0].mode",
        "expected one of \"auto\" | \"xdp\" | \"xdp-native\"",
    );
    assert_has(
        &errs,
        "dataplane.interfaces[1].name",
        "expected an interface name",
    );
    assert_has(
        &errs,
        "dataplane.max_sessions",
        "expected an integer in 1..=",
    );
    assert_has(&errs, "dataplane.max_session_lifetime", "from 1m to 30d");
}

#[test]
fn warnings_do_not_stop_the_configuration() {
    let src = format!(
        "{BASE}[[policy.rules]]\nname = \"open\"\nservices = [\"dns\"]\naction = \"allow\"\n\
         [[policy.rules]]\nname = \"late\"\nsources = [\"group:x\"]\nservices = [\"dns\"]\naction = \"allow\"\n\
         max_session_lifetime = \"1d\"\n"
    );
    let (c, warnings) = ok(&src);
    assert_eq!(c.policy.rules.len(), 2);
    // Nothing allows `api`.
    assert_has(
        &warnings,
        "services[0]",
        "no enabled rule can allow service `api`",
    );
    // `open` lets everyone in without a token.
    assert_has(
        &warnings,
        "policy.rules[0]",
        "allows every source address without a token",
    );
    // `late` comes after a rule that matches all its traffic.
    assert_has(
        &warnings,
        "policy.rules[1]",
        "can never match: earlier rule `open`",
    );
    assert_has(&warnings, "policy.rules[1].max_session_lifetime", "capped");
}

#[test]
fn lifetimes_on_refusing_rules_and_long_idle_timeouts_warn() {
    let src = format!(
        "{BASE}{ALLOW_ALL_USERS}[[policy.rules]]\nname = \"d\"\nsources = [\"group:x\"]\n\
         services = [\"api\"]\naction = \"drop\"\nidle_timeout = \"5m\"\n\
         [[policy.rules]]\nname = \"a\"\nsources = [\"group:y\"]\nservices = [\"api\"]\n\
         action = \"allow\"\nmax_session_lifetime = \"1h\"\nidle_timeout = \"2h\"\n"
    );
    let (_, warnings) = ok(&src);
    assert_has(
        &warnings,
        "policy.rules[1].idle_timeout",
        "no effect on a drop rule",
    );
    assert_has(&warnings, "policy.rules[2].idle_timeout", "never applies");
}

#[test]
fn a_static_allow_after_an_identity_refusal_is_refused() {
    let src = format!(
        "{BASE}{ALLOW_ALL_USERS}[[policy.rules]]\nname = \"contractors\"\nsources = [\"group:contractors\"]\n\
         services = [\"api\"]\naction = \"drop\"\n\
         [[policy.rules]]\nname = \"office\"\nsource_cidrs = [\"10.0.0.0/8\"]\nservices = [\"api\"]\naction = \"allow\"\n"
    );
    let errs = errors(&src);
    assert_has(
        &errs,
        "policy.rules[2]",
        "earlier identity rule `contractors` (drop)",
    );
    assert_has(
        &errs,
        "policy.rules[2]",
        "move `office` above `contractors`",
    );
}

#[test]
fn duration_format() {
    let secs = |s: &str| parse_duration(s).map(|d| d.as_secs());
    assert_eq!(secs("90s"), Ok(90));
    assert_eq!(secs("15m"), Ok(900));
    assert_eq!(secs("12h"), Ok(43_200));
    assert_eq!(secs("1d"), Ok(86_400));
    assert_eq!(secs("1h30m"), Ok(5_400));
    assert_eq!(secs("1d2h3m4s"), Ok(93_784));
    for bad in [
        "",
        "10",
        "30m1h",
        "1h1h",
        "5x",
        "h",
        "1.5h",
        "1h ",
        "-1s",
        "99999999999999999999d",
    ] {
        assert!(parse_duration(bad).is_err(), "{bad:?} was accepted");
    }
    for s in ["1h30m", "12h", "1d2h3m4s", "45s", "0s"] {
        assert_eq!(format_duration(parse_duration(s).unwrap()), s);
    }
}

#[test]
fn dataplane_services_are_numbered_in_file_order() {
    let (c, _) = ok(&format!("{BASE}{ALLOW_ALL_USERS}"));
    let s = c.dataplane_services();
    assert_eq!(s.len(), 2);
    assert_eq!(
        (s[0].id.get(), s[0].protocol, s[0].port, s[0].action),
        (1, Protocol::Tcp, 8000, ServiceAction::Reset)
    );
    assert_eq!(
        (s[1].id.get(), s[1].protocol, s[1].port, s[1].action),
        (2, Protocol::Udp, 53, ServiceAction::Drop)
    );
    let o = c.dataplane.load_options();
    assert_eq!(
        (o.max_sessions, o.events_per_sec, o.events_burst),
        (65_536, 200, 400)
    );
}

#[test]
fn load_reports_the_file() {
    let dir = std::env::temp_dir().join(format!("idgate-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let missing = dir.join("missing.toml");
    assert!(matches!(
        Config::load(&missing),
        Err(LoadError::Read { .. })
    ));
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[dataplane]\n").unwrap();
    let e = Config::load(&bad).unwrap_err();
    assert!(matches!(&e, LoadError::Invalid { path, .. } if *path == bad));
    assert!(e.to_string().starts_with(&format!("{}: ", bad.display())));
    let good = dir.join("good.toml");
    std::fs::write(&good, format!("{BASE}{ALLOW_ALL_USERS}")).unwrap();
    assert!(Config::load(&good).is_ok());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn max_token_bytes_stays_within_what_the_verifier_accepts() {
    let base = format!("{BASE}{ALLOW_ALL_USERS}");
    let with = |n: usize| {
        replace(
            &base,
            "audiences = [\"idgate\"]\n\n[[issuers]]",
            &format!("audiences = [\"idgate\"]\nmax_token_bytes = {n}\n\n[[issuers]]"),
        )
    };
    let (c, _) = ok(&with(crate::identity::MAX_TOKEN_BYTES_LIMIT));
    crate::wiring::issuer_settings(&c.issuers[0])
        .unwrap()
        .validate()
        .unwrap();
    assert_has(
        &errors(&with(crate::identity::MAX_TOKEN_BYTES_LIMIT + 1)),
        "issuers[0].max_token_bytes",
        "",
    );
}

#[test]
fn userid_section_reads_firewalls_tags_and_defaults() {
    let (c, _) = ok(&format!("{BASE}{ALLOW_ALL_USERS}"));
    assert_eq!(c.userid, None);
    let src = format!(
        r#"{BASE}{ALLOW_ALL_USERS}
[userid]
register_tags = "idgate-"
batch_size = 100

[[userid.firewalls]]
url = "https://fw1.example.com/"
api_key_file = "/etc/idgate/fw1.key"
ca_file = "/etc/idgate/fw-ca.pem"

[[userid.firewalls]]
url = "https://192.0.2.1:4443"
api_key_file = "/etc/idgate/fw2.key"
vsys = "vsys2"
"#
    );
    let (c, _) = ok(&src);
    let u = c.userid.unwrap();
    assert_eq!(
        u.firewalls,
        [
            FirewallConfig {
                url: "https://fw1.example.com".into(),
                api_key_file: "/etc/idgate/fw1.key".into(),
                ca_file: Some("/etc/idgate/fw-ca.pem".into()),
                vsys: None,
            },
            FirewallConfig {
                url: "https://192.0.2.1:4443".into(),
                api_key_file: "/etc/idgate/fw2.key".into(),
                ca_file: None,
                vsys: Some("vsys2".into()),
            },
        ]
    );
    assert_eq!(
        u.register_tags,
        Some(TagConfig {
            prefix: "idgate-".into()
        })
    );
    assert_eq!(u.batch_size, 100);
    assert_eq!(u.queue_size, 10_000);
    assert_eq!(u.flush_interval, Duration::from_secs(1));
    assert_eq!(u.request_timeout, Duration::from_secs(10));
    assert_eq!(u.max_backoff, Duration::from_secs(60));

    let tags = |v: &str| {
        let src = format!(
            "{BASE}{ALLOW_ALL_USERS}\n[userid]\nregister_tags = {v}\n[[userid.firewalls]]\nurl = \
             \"https://fw\"\napi_key_file = \"/k\"\n"
        );
        ok(&src).0.userid.unwrap().register_tags
    };
    assert_eq!(tags("true"), Some(TagConfig { prefix: "".into() }));
    assert_eq!(tags("false"), None);
}

#[test]
fn userid_section_errors_say_where_and_what() {
    let src = format!(
        r#"{BASE}{ALLOW_ALL_USERS}
[userid]
register_tags = 3
batch_size = 0
colour = "red"

[[userid.firewalls]]
url = "http://fw1.example.com"
api_key_file = "fw1.key"

[[userid.firewalls]]
url = "https://fw2.example.com/api/?key=secret"
api_key_file = "/etc/idgate/fw2.key"
vsys = "shared"

[[userid.firewalls]]
url = "https://fw3.example.com"
"#
    );
    let e = errors(&src);
    let has = |path: &str, needle: &str| {
        assert!(
            e.iter()
                .any(|d| d.path == path && d.message.contains(needle) && d.line.is_some()),
            "no error at {path} containing {needle:?} in {e:#?}"
        );
    };
    has("userid.register_tags", "tag prefix");
    has("userid.batch_size", "1..=5000");
    has("userid.colour", "unknown key");
    has("userid.firewalls[0].url", "https://");
    has("userid.firewalls[0].api_key_file", "absolute path");
    has("userid.firewalls[1].url", "no path, query or credentials");
    has("userid.firewalls[1].vsys", "vsys1");
    has("userid.firewalls[2].api_key_file", "missing key");

    let none = format!("{BASE}{ALLOW_ALL_USERS}\n[userid]\nfirewalls = []\n");
    let e = errors(&none);
    assert!(
        e.iter()
            .any(|d| d.path == "userid.firewalls" && d.message.contains("at least one")),
        "{e:#?}"
    );
    let twice = format!(
        "{BASE}{ALLOW_ALL_USERS}\n[[userid.firewalls]]\nurl = \"https://fw\"\napi_key_file = \
         \"/k\"\n[[userid.firewalls]]\nurl = \"https://fw/\"\napi_key_file = \"/k\"\n"
    );
    let e = errors(&twice);
    assert!(
        e.iter()
            .any(|d| d.path == "userid.firewalls[1].url" && d.message.contains("twice")),
        "{e:#?}"
    );
}
