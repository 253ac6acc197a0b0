use std::net::IpAddr;

use serde_json::json;

use super::*;
use crate::policy::{Identity, ServiceDecision};

const ASSETS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/assets/panos");
const HOST: &str = "10.1.2.10";
const ISSUER: &str = "https://idp.example.com";

fn asset(name: &str) -> String {
    std::fs::read_to_string(format!("{ASSETS}/{name}")).unwrap()
}

/// The fixtures' idgate configuration without its [policy] section.
fn base() -> String {
    let text = asset("idgate.toml");
    let at = text.find("\n[policy]").unwrap();
    text[..at].to_owned()
}

fn config() -> Config {
    Config::parse(&asset("idgate.toml")).unwrap().0
}

/// A firewall configuration: objects (XML under vsys1) and rules (entries).
fn firewall(objects: &str, rules: &str) -> String {
    format!(
        r#"<config><shared/><devices><entry name="localhost.localdomain"><vsys><entry name="vsys1">
        {objects}<rulebase><security><rules>{rules}</rules></security></rulebase>
        </entry></vsys></entry></devices></config>"#
    )
}

/// A rule entry: `fields` is raw XML for what differs from "any to the host, tcp/8000 (svc-api
/// must exist), allow".
fn rule(name: &str, fields: &str) -> String {
    let mut xml = format!(r#"<entry name="{name}">{fields}"#);
    for (tag, default) in [
        ("from", "<member>any</member>"),
        ("to", "<member>any</member>"),
        ("source", "<member>any</member>"),
        ("destination", "<member>10.1.2.10</member>"),
        ("source-user", "<member>any</member>"),
        ("application", "<member>any</member>"),
        ("service", "<member>svc-api</member>"),
        ("action", "allow"),
    ] {
        if !fields.contains(&format!("<{tag}>")) {
            xml.push_str(&format!("<{tag}>{default}</{tag}>"));
        }
    }
    xml + "</entry>"
}

const API: &str = r#"<service><entry name="svc-api"><protocol><tcp><port>8000</port></tcp></protocol></entry></service>"#;

fn mapping() -> Mapping {
    Mapping::parse(
        r#"
        [users]
        'corp\alice' = "alice"
        [groups]
        "cn=api-users,ou=groups,dc=example,dc=com" = "api-users"
        "contractors" = "contractors"
        "#,
    )
    .unwrap()
}

fn run(xml: &str) -> Import {
    import(xml, &mapping(), &config(), &[HOST.parse().unwrap()]).unwrap()
}

fn statuses(i: &Import) -> Vec<(String, Status)> {
    i.report
        .rules
        .iter()
        .map(|r| (r.name.clone(), r.status))
        .collect()
}

fn reasons(i: &Import, name: &str) -> String {
    let r = i.report.rules.iter().find(|r| r.name == name).unwrap();
    r.reasons.join(" | ")
}

fn rule_named<'a>(i: &'a Import, name: &str) -> &'a Rule {
    i.rules.iter().find(|r| r.name == name).unwrap()
}

fn cidrs(r: &Rule) -> Vec<String> {
    r.source_cidrs.iter().map(ToString::to_string).collect()
}

/// The imported policy inside the fixtures' configuration, through idgate's own parser.
fn accepted(i: &Import) -> Config {
    let text = format!("{}\n{}", base(), i.policy_toml());
    match Config::parse(&text) {
        Ok((c, _)) => c,
        Err(e) => panic!("{e}\n{text}"),
    }
}

fn who(user: &str, groups: &[&str]) -> Identity {
    Identity {
        issuer: ISSUER.to_owned(),
        user: user.to_owned(),
        groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        scopes: Vec::new(),
        claims: json!({}),
    }
}

fn decision<'a>(ds: &'a [ServiceDecision], service: &str) -> &'a ServiceDecision {
    ds.iter().find(|d| d.service == service).unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn actions_map_onto_idgate_actions() {
    let rules: String = [
        ("a-allow", "allow"),
        ("a-deny", "deny"),
        ("a-drop", "drop"),
        ("a-reset-client", "reset-client"),
        ("a-reset-both", "reset-both"),
        ("a-reset-server", "reset-server"),
    ]
    .iter()
    .map(|(n, a)| {
        rule(
            n,
            &format!("<source-user><member>contractors</member></source-user><action>{a}</action>"),
        )
    })
    .collect();
    let i = run(&firewall(API, &rules));
    let actions: Vec<Action> = i.rules.iter().map(|r| r.action).collect();
    use Action::*;
    assert_eq!(actions, [Allow, Drop, Drop, Reset, Reset, Drop]);
    assert!(i.report.is_complete());

    let i = run(&firewall(
        API,
        &rule("odd", "<action>icmp-unreachable</action>"),
    ));
    assert_eq!(statuses(&i), [("odd".to_owned(), Status::Refused)]);
    assert!(reasons(&i, "odd").contains("unknown action"));
}

#[test]
fn negated_sources_become_the_complement_and_negated_destinations_are_followed() {
    let xml = firewall(
        API,
        &[
            rule(
                "not-office",
                "<source><member>10.0.0.0/8</member></source><negate-source>yes</negate-source><action>drop</action>",
            ),
            rule(
                "not-us",
                "<destination><member>10.1.2.0/24</member></destination><negate-destination>yes</negate-destination>",
            ),
            rule(
                "not-them",
                "<destination><member>192.0.2.0/24</member></destination><negate-destination>yes</negate-destination><source-user><member>contractors</member></source-user>",
            ),
            rule("nobody", "<negate-source>yes</negate-source>"),
        ]
        .concat(),
    );
    let i = run(&xml);
    let r = rule_named(&i, "not-office");
    assert_eq!(
        cidrs(r),
        [
            "0.0.0.0/5",
            "8.0.0.0/7",
            "11.0.0.0/8",
            "12.0.0.0/6",
            "16.0.0.0/4",
            "32.0.0.0/3",
            "64.0.0.0/2",
            "128.0.0.0/1",
            "::/0"
        ]
    );
    assert_eq!(i.report.rules[1].status, Status::Skipped);
    assert!(reasons(&i, "not-us").contains("does not include this host"));
    assert_eq!(i.report.rules[2].status, Status::Translated);
    assert_eq!(i.report.rules[3].status, Status::Skipped);
    assert!(reasons(&i, "nobody").contains("matches no address"));

    let c = accepted(&i);
    let p = c.policy();
    assert_eq!(
        decision(&p.evaluate_unauthenticated(ip("192.0.2.1")), "api").action,
        Action::Drop
    );
    let inside = p.evaluate(&who("x", &["contractors"]), ip("10.9.9.9"));
    assert_eq!(
        decision(&inside, "api").rule.as_ref().unwrap().name,
        "not-them"
    );
}

#[test]
fn disabled_rules_stay_disabled_or_are_skipped_when_untranslatable() {
    let xml = firewall(
        API,
        &[
            rule("off", "<disabled>yes</disabled><source-user><member>contractors</member></source-user>"),
            rule("off-unmapped", "<disabled>yes</disabled><source-user><member>nobody-knows</member></source-user><action>deny</action>"),
        ]
        .concat(),
    );
    let i = run(&xml);
    assert!(!rule_named(&i, "off").enabled);
    assert_eq!(i.report.rules[1].status, Status::Skipped);
    assert!(reasons(&i, "off-unmapped").contains("disabled in PAN-OS"));
    // A disabled rule decides nothing, so skipping it leaves the import complete.
    assert!(i.report.is_complete());
    let p = accepted(&i).policy();
    let d = p.evaluate(&who("x", &["contractors"]), ip("10.9.9.9"));
    assert_eq!(decision(&d, "api").rule, None);
}

#[test]
fn ranges_and_nested_groups_resolve_and_cycles_are_refused() {
    let objects = format!(
        r#"<address>
            <entry name="r"><ip-range>10.0.0.1-10.0.0.9</ip-range></entry>
            <entry name="n"><ip-netmask>172.16.5.7/16</ip-netmask></entry>
            <entry name="h6"><ip-netmask>2001:db8::1</ip-netmask></entry>
        </address>
        <address-group>
            <entry name="inner"><static><member>r</member><member>n</member></static></entry>
            <entry name="outer"><static><member>inner</member><member>h6</member><member>192.0.2.0/25</member></static></entry>
            <entry name="loop-a"><static><member>loop-b</member></static></entry>
            <entry name="loop-b"><static><member>r</member><member>loop-a</member></static></entry>
        </address-group>{API}"#
    );
    let xml = firewall(
        &objects,
        &[
            rule("nested", "<source><member>outer</member></source>"),
            rule("cycle", "<source><member>loop-a</member></source>"),
        ]
        .concat(),
    );
    let i = run(&xml);
    assert_eq!(
        cidrs(rule_named(&i, "nested")),
        [
            "10.0.0.1/32",
            "10.0.0.2/31",
            "10.0.0.4/30",
            "10.0.0.8/31",
            "172.16.0.0/16",
            "192.0.2.0/25",
            "2001:db8::1/128"
        ]
    );
    assert_eq!(i.report.rules[1].status, Status::Refused);
    assert!(reasons(&i, "cycle").contains("cycle: loop-a -> loop-b -> loop-a"));
}

#[test]
fn fqdn_wildcard_and_dynamic_sources_are_refused_with_the_reason() {
    let objects = format!(
        r#"<address>
            <entry name="f"><fqdn>app.example.com</fqdn></entry>
            <entry name="w"><ip-wildcard>10.0.0.0/0.0.255.0</ip-wildcard></entry>
        </address>
        <address-group><entry name="d"><dynamic><filter>'web'</filter></dynamic></entry></address-group>{API}"#
    );
    let xml = firewall(
        &objects,
        &[
            rule("fqdn", "<source><member>f</member></source>"),
            rule("wild", "<source><member>w</member></source>"),
            rule("dyn", "<source><member>d</member></source>"),
            rule("dangling", "<source><member>nowhere</member></source>"),
        ]
        .concat(),
    );
    let i = run(&xml);
    assert!(i.report.rules.iter().all(|r| r.status == Status::Refused));
    assert!(reasons(&i, "fqdn").contains("fqdn app.example.com, unsupported"));
    assert!(reasons(&i, "wild").contains("ip-wildcard"));
    assert!(reasons(&i, "dyn").contains("dynamic address group"));
    assert!(reasons(&i, "dangling").contains("neither an address object"));
    assert!(i.rules.is_empty());
}

#[test]
fn only_rules_for_this_host_and_its_protected_services_are_taken() {
    let objects = r#"<service>
        <entry name="svc-api"><protocol><tcp><port>8000</port></tcp></protocol></entry>
        <entry name="ssh"><protocol><tcp><port>22</port></tcp></protocol></entry>
        <entry name="wide"><protocol><tcp><port>80,7000-8999</port></tcp></protocol></entry>
        <entry name="dns-src"><protocol><udp><port>53</port><source-port>1024-65535</source-port></udp></protocol></entry>
    </service>
    <service-group>
        <entry name="inner"><members><member>wide</member></members></entry>
        <entry name="outer"><members><member>inner</member><member>ssh</member></members></entry>
    </service-group>"#;
    let xml = firewall(
        objects,
        &[
            rule("elsewhere", "<destination><member>10.1.2.11</member></destination>"),
            rule("ssh-only", "<service><member>ssh</member></service>"),
            rule("range", "<service><member>outer</member></service>"),
            rule("src-port", "<service><member>dns-src</member></service>"),
            rule("app-default", "<service><member>application-default</member></service><application><member>ssh</member></application>"),
            rule("subnet", "<destination><member>10.1.0.0/16</member></destination>"),
        ]
        .concat(),
    );
    let i = run(&xml);
    use Status::*;
    assert_eq!(
        statuses(&i).into_iter().map(|(_, s)| s).collect::<Vec<_>>(),
        [Skipped, Skipped, Translated, Refused, Refused, Translated]
    );
    assert!(reasons(&i, "ssh-only").contains("includes no protected service"));
    assert_eq!(
        rule_named(&i, "range").services,
        ServiceSelector::Named(vec!["api".to_owned()])
    );
    assert!(reasons(&i, "src-port").contains("source-port"));
    assert!(reasons(&i, "app-default").contains("[applications]"));

    // With two host addresses, a destination holding only one cannot be told apart.
    let two = [ip(HOST), ip("2001:db8:1::10")];
    let i = import(
        &firewall(API, &rule("v4-only", "")),
        &mapping(),
        &config(),
        &two,
    )
    .unwrap();
    assert_eq!(i.report.rules[0].status, Refused);
    assert!(reasons(&i, "v4-only").contains("only some of this host's addresses"));
}

#[test]
fn source_users_map_through_the_mapping_and_unmapped_ones_are_refused() {
    let xml = firewall(
        API,
        &[
            rule(
                "mapped",
                r"<source-user><member>CN=API-Users, OU=Groups, DC=example, DC=com</member><member>corp\Alice</member></source-user>",
            ),
            rule("known", "<source-user><member>known-user</member></source-user>"),
            rule("unmapped", "<source-user><member>corp\\mallory</member></source-user>"),
        ]
        .concat(),
    );
    let i = run(&xml);
    assert_eq!(
        rule_named(&i, "mapped").sources,
        [
            SourceMatcher::Group("api-users".to_owned()),
            SourceMatcher::User("alice".to_owned())
        ]
    );
    assert_eq!(rule_named(&i, "known").sources, [SourceMatcher::KnownUser]);
    assert_eq!(i.report.rules[2].status, Status::Refused);
    assert!(reasons(&i, "unmapped").contains("corp\\\\mallory"));
}

#[test]
fn a_refused_refusal_withholds_the_allows_it_could_have_refused() {
    let xml = firewall(
        API,
        &[
            // A refused allow: leaving it out can only refuse more.
            rule("unmapped-allow", "<source-user><member>ghost</member></source-user>"),
            rule("after-allow", "<source-user><member>contractors</member></source-user>"),
            // A refused deny from 10/8: later allows that could reach 10/8 must not be imported.
            rule(
                "unmapped-deny",
                "<source><member>10.0.0.0/8</member></source><source-user><member>ghost</member></source-user><action>deny</action>",
            ),
            rule("overlapping", "<source><member>10.5.0.0/16</member></source>"),
            rule("disjoint", "<source><member>192.0.2.0/24</member></source>"),
            // Refusing traffic without a user only matters to allows that such traffic reaches.
            rule("no-unknown", "<source-user><member>unknown</member></source-user><action>deny</action>"),
            rule(
                "identity-after",
                "<source><member>172.16.0.0/12</member></source><source-user><member>known-user</member></source-user>",
            ),
            rule("static-after", "<source><member>198.51.100.0/24</member></source>"),
        ]
        .concat(),
    );
    let i = run(&xml);
    use Status::*;
    assert_eq!(
        statuses(&i).into_iter().map(|(_, s)| s).collect::<Vec<_>>(),
        [
            Refused, Translated, Refused, Withheld, Translated, Refused, Translated, Withheld
        ]
    );
    assert!(reasons(&i, "overlapping").contains("follows refused rule \"unmapped-deny\""));
    assert!(reasons(&i, "static-after").contains("\"no-unknown\""));
    assert!(!i.report.is_complete());
    accepted(&i);
}

#[test]
fn allows_the_kernel_could_not_honour_are_withheld() {
    let xml = firewall(
        API,
        &[
            rule(
                "contractors-out",
                "<source-user><member>contractors</member></source-user><action>drop</action>",
            ),
            rule(
                "everyone-in",
                "<source><member>10.0.0.0/8</member></source>",
            ),
        ]
        .concat(),
    );
    let i = run(&xml);
    assert_eq!(i.report.rules[1].status, Status::Withheld);
    assert!(reasons(&i, "everyone-in").contains("idgate would refuse it"));
    let p = accepted(&i).policy();
    let d = p.evaluate(&who("c", &["contractors"]), ip("10.1.1.1"));
    assert_eq!(decision(&d, "api").action, Action::Drop);
}

#[test]
fn panorama_rules_come_in_order_with_device_group_objects_first() {
    let i = import(
        &asset("panorama.xml"),
        &Mapping::parse(&asset("panorama-mapping.toml")).unwrap(),
        &config(),
        &[],
    )
    .unwrap();
    let names: Vec<&str> = i.rules.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "shared-pre-scanners",
            "dg-pre-admins",
            "dg-post-users",
            "shared-post-deny"
        ]
    );
    assert!(i.report.is_complete());
    assert_eq!(i.report.source, "Panorama, device group dc-east");
    let c = accepted(&i);
    let p = c.policy();
    // api-host is dc-east's 10.1.2.10, not the shared 192.0.2.99: the rule applies here.
    let d = p.evaluate(&who("u", &["api-users"]), ip("10.3.3.3"));
    assert_eq!(
        decision(&d, "api").rule.as_ref().unwrap().name,
        "dg-post-users"
    );
    let d = p.evaluate(&who("u", &["api-users"]), ip("192.0.2.1"));
    assert_eq!(
        decision(&d, "api").rule.as_ref().unwrap().name,
        "shared-post-deny"
    );
    let d = p.evaluate_unauthenticated(ip("192.0.2.201"));
    assert_eq!(decision(&d, "dns").action, Action::Reset);

    // Several device groups and none named: the operator must choose.
    let err = import(
        &asset("panorama.xml"),
        &Mapping::default(),
        &config(),
        &[ip(HOST)],
    )
    .unwrap_err();
    assert!(err.to_string().contains("dc-east, dc-west"), "{err}");
}

#[test]
fn bad_inputs_are_errors_not_partial_imports() {
    let m = mapping();
    let c = config();
    let host = [ip(HOST)];
    let err = import("<config><devices>", &m, &c, &host).unwrap_err();
    assert!(matches!(err, ImportError::Panos(_)), "{err}");
    let err = import("<policy/>", &m, &c, &host).unwrap_err();
    assert!(err.to_string().contains("expected a <config>"), "{err}");
    let err = import(&firewall(API, ""), &m, &c, &[]).unwrap_err();
    assert!(matches!(err, ImportError::NoHostAddress));
    let mut other = mapping();
    other.vsys = Some("vsys9".to_owned());
    let err = import(&firewall(API, ""), &other, &c, &host).unwrap_err();
    assert!(
        err.to_string().contains("vsys \"vsys9\" not found"),
        "{err}"
    );
    assert!(Mapping::parse("[users]\nx = []").is_err());
    assert!(Mapping::parse("colour = \"red\"").is_err());
    assert!(Mapping::parse("[applications]\nssh = [\"tcp/0\"]").is_err());
    let mut m2 = mapping();
    m2.issuer = Some("https://elsewhere.example.com".to_owned());
    assert!(import(&firewall(API, ""), &m2, &c, &host).is_err());
}

#[test]
fn the_firewall_fixture_translates_into_a_policy_idgate_enforces_as_pan_os_said() {
    let i = import(
        &asset("firewall.xml"),
        &Mapping::parse(&asset("mapping.toml")).unwrap(),
        &config(),
        &[],
    )
    .unwrap();
    use Status::*;
    assert_eq!(
        statuses(&i).into_iter().map(|(_, s)| s).collect::<Vec<_>>(),
        [
            Translated, Translated, Translated, Translated, Translated, Translated, Translated,
            Skipped, Skipped, Translated, Refused, Refused, Translated, Withheld
        ]
    );
    let p = accepted(&i).policy();
    let action = |ds: Vec<ServiceDecision>, svc: &str| {
        let d = decision(&ds, svc);
        (d.action, d.rule.as_ref().map(|r| r.name.clone()))
    };
    let named = |a: Action, n: &str| (a, Some(n.to_owned()));
    // The API's people, by group or by user name, from anywhere.
    assert_eq!(
        action(
            p.evaluate(&who("bob", &["api-users"]), ip("10.9.9.9")),
            "api"
        ),
        named(Action::Allow, "API-users")
    );
    assert_eq!(
        action(
            p.evaluate(&who("alice@example.com", &[]), ip("10.9.9.9")),
            "api"
        ),
        named(Action::Allow, "API-users")
    );
    assert_eq!(
        action(
            p.evaluate(&who("carol", &["contractors"]), ip("10.9.9.9")),
            "api"
        ),
        named(Action::Reset, "Contractors-out")
    );
    // The blocklist beats everything, token or not.
    assert_eq!(
        action(
            p.evaluate(&who("bob", &["api-users"]), ip("198.51.100.15")),
            "api"
        ),
        named(Action::Drop, "Block-bad-ranges")
    );
    assert_eq!(
        action(p.evaluate_unauthenticated(ip("2001:db8:bad::1")), "dns"),
        named(Action::Drop, "Block-bad-ranges")
    );
    // Health checks without a token.
    assert_eq!(
        action(p.evaluate_unauthenticated(ip("10.20.0.7")), "api"),
        named(Action::Allow, "LB-health")
    );
    // Metrics: known users, from the office only.
    assert_eq!(
        action(p.evaluate(&who("bob", &[]), ip("10.40.1.1")), "metrics"),
        named(Action::Allow, "Metrics-for-known-users")
    );
    assert_eq!(
        action(p.evaluate(&who("bob", &[]), ip("10.50.1.1")), "metrics"),
        named(Action::Drop, "Metrics-only-from-the-office")
    );
    // DNS through application-default; the disabled admin rule decides nothing.
    assert_eq!(
        action(p.evaluate(&who("bob", &[]), ip("10.9.9.9")), "dns"),
        named(Action::Allow, "DNS")
    );
    assert_eq!(
        action(p.evaluate(&who("root", &["admins"]), ip("10.9.9.9")), "api"),
        (Action::Drop, None)
    );
}
