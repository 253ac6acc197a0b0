//! Reads a document into a [`Config`] and validates it, collecting every error on the way.
//!
//! Each section reader reports its own errors and returns `None` when something in it was wrong;
//! reading and cross-checking go on with what was valid, so one run finds as many problems as
//! possible. Any error at all means `Err`: nothing partial is ever returned.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    ops::Range,
    path::PathBuf,
    time::Duration,
};

use ipnet::IpNet;
use toml::de::DeTable;

use super::{
    ALGORITHMS, AdminConfig, AuditConfig, Config, ConfigErrors, DEFAULT_ADMIN_SOCKET,
    DataplaneConfig, Diagnostic, GroupClaim, GroupClaimFormat, InterfaceConfig, IssuerConfig,
    PolicyConfig, ServiceConfig, SessionEndpointConfig, TlsFiles, format_duration, parse_duration,
    reader::{Diags, Table, Val, join},
};
use crate::{
    dataplane::{AttachMode, CidrAction, Protocol, ServiceAction},
    policy::{self, Action, Policy, Rule, ServiceSelector, Severity, SourceMatcher, Subject},
};

/// Default bound on session lifetime.
const DEFAULT_MAX_SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Largest sessions map we accept (it is preallocated: about 64 bytes an entry).
const MAX_SESSIONS_LIMIT: i64 = 1 << 24;
/// Largest leeway: more would accept tokens that expired minutes ago.
const MAX_LEEWAY: Duration = Duration::from_secs(300);

pub(super) fn parse(src: &str) -> Result<(Config, Vec<Diagnostic>), ConfigErrors> {
    let mut d = Diags::new(src);
    let (doc, syntax) = DeTable::parse_recoverable(src);
    if !syntax.is_empty() {
        // Validating a document the parser had to guess at would report phantom problems.
        for e in syntax {
            d.error("", e.span(), e.message().trim_end());
        }
        return Err(errors(d));
    }
    let mut root = Table::root(&doc);

    let dataplane = root
        .required(&mut d, "dataplane", "a [dataplane] table")
        .and_then(|v| v.table(&mut d))
        .and_then(|t| read_dataplane(t, &mut d));
    let services = read_services(&mut root, &mut d);
    let issuers = read_issuers(&mut root, &mut d);
    let session_endpoint = root
        .required(&mut d, "session_endpoint", "a [session_endpoint] table")
        .and_then(|v| v.table(&mut d))
        .and_then(|t| read_session_endpoint(t, &mut d));
    let admin = match root.get("admin") {
        None => Some(AdminConfig::with_socket(PathBuf::from(
            DEFAULT_ADMIN_SOCKET,
        ))),
        Some(v) => v.table(&mut d).and_then(|t| read_admin(t, &mut d)),
    };
    let audit = match root.get("audit") {
        None => Some(AuditConfig::Stdout),
        Some(v) => v.table(&mut d).and_then(|t| read_audit(t, &mut d)),
    };
    let userid = match root.get("userid") {
        None => Some(None),
        Some(v) => v
            .table(&mut d)
            .and_then(|t| super::userid::read_userid(t, &mut d))
            .map(Some),
    };
    let lifetime = dataplane
        .as_ref()
        .map_or(DEFAULT_MAX_SESSION_LIFETIME, |p| p.max_session_lifetime);
    let policy = root
        .required(
            &mut d,
            "policy",
            "a [policy] table with `default` and [[policy.rules]]",
        )
        .and_then(|v| v.table(&mut d))
        .map(|t| read_policy(t, &mut d, &services, &issuers, lifetime));
    root.finish(&mut d);

    if let (Some(ep), Some(svcs)) = (&session_endpoint, &services.valid) {
        check_lockout(ep, svcs, &mut d);
    }
    if let Some(p) = &policy {
        analyse_policy(p, &services, lifetime, &mut d);
    }

    match (
        dataplane,
        services.valid,
        issuers.valid,
        session_endpoint,
        (admin, audit, userid),
        policy,
    ) {
        (
            Some(dataplane),
            Some(services),
            Some(issuers),
            Some(session_endpoint),
            (Some(admin), Some(audit), Some(userid)),
            Some(p),
        ) if d.errors.is_empty() => {
            let Some(default) = p.default else {
                return Err(errors(d));
            };
            let config = Config {
                dataplane,
                services: services.into_iter().map(|(s, _)| s).collect(),
                issuers,
                session_endpoint,
                admin,
                audit,
                userid,
                policy: PolicyConfig {
                    default,
                    rules: p.rules.into_iter().map(|r| r.rule).collect(),
                },
            };
            let mut warnings = d.warnings;
            sort(&mut warnings);
            Ok((config, warnings))
        }
        _ => Err(errors(d)),
    }
}

fn sort(list: &mut [Diagnostic]) {
    list.sort_by_key(|e| (e.line.is_none(), e.line, e.column));
}

fn errors(mut d: Diags<'_>) -> ConfigErrors {
    if d.errors.is_empty() {
        // Unreachable by construction (a section is only missing after an error), but never
        // return an empty error list.
        d.error("", None, "invalid configuration");
    }
    sort(&mut d.errors);
    ConfigErrors(d.errors)
}

// ---------------------------------------------------------------------------------------------
// Value helpers

/// A value that is present, or the default; `None` if present and wrong (already reported).
pub(super) fn or_default<'a, 'i, T>(
    v: Option<Val<'a, 'i>>,
    default: T,
    read: impl FnOnce(Val<'a, 'i>) -> Option<T>,
) -> Option<T> {
    match v {
        None => Some(default),
        Some(v) => read(v),
    }
}

pub(super) fn duration(
    v: &Val<'_, '_>,
    d: &mut Diags<'_>,
    min: Duration,
    max: Duration,
) -> Option<Duration> {
    let s = v.str(d)?;
    match parse_duration(s) {
        Ok(x) if x >= min && x <= max => Some(x),
        Ok(_) => {
            v.error(
                d,
                format!(
                    "expected a duration from {} to {}, found {s:?}",
                    format_duration(min),
                    format_duration(max)
                ),
            );
            None
        }
        Err(e) => {
            v.error(d, e);
            None
        }
    }
}

/// A name for services and rules: what can appear in logs and on command lines unquoted.
fn name(v: &Val<'_, '_>, d: &mut Diags<'_>) -> Option<String> {
    let s = v.str(d)?;
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        v.error(
            d,
            format!(
                "expected a name of 1 to 63 letters, digits, '-', '_' or '.', starting with a \
                 letter or digit, found {s:?}"
            ),
        );
        return None;
    }
    Some(s.to_owned())
}

pub(super) fn absolute_path(v: &Val<'_, '_>, d: &mut Diags<'_>) -> Option<PathBuf> {
    let s = v.str(d)?;
    if !s.starts_with('/') {
        v.error(
            d,
            format!("expected an absolute path (the agent's working directory is not yours), found {s:?}"),
        );
        return None;
    }
    Some(PathBuf::from(s))
}

/// A network (`10.0.0.0/8`) or a single address. Host bits must be zero; IPv4-mapped IPv6
/// networks become IPv4 ones, as the kernel treats them.
fn cidr(v: &Val<'_, '_>, d: &mut Diags<'_>) -> Option<IpNet> {
    let s = v.str(d)?;
    let net = match (s.parse::<IpNet>(), s.parse::<IpAddr>()) {
        (Ok(n), _) => n,
        (_, Ok(a)) => IpNet::from(a),
        _ => {
            v.error(
                d,
                format!("expected a network such as \"10.0.0.0/8\" or \"2001:db8::/32\", or an address, found {s:?}"),
            );
            return None;
        }
    };
    if net.trunc() != net {
        v.error(
            d,
            format!("{s:?} has host bits set; did you mean \"{}\"?", net.trunc()),
        );
        return None;
    }
    if let IpNet::V6(n) = net
        && n.prefix_len() >= 96
        && let Some(v4) = n.network().to_ipv4_mapped()
    {
        return ipnet::Ipv4Net::new(v4, n.prefix_len() - 96)
            .ok()
            .map(IpNet::V4);
    }
    Some(net)
}

fn is_loopback_addr(a: &SocketAddr) -> bool {
    a.ip().to_canonical().is_loopback()
}

// ---------------------------------------------------------------------------------------------
// [dataplane]

fn read_dataplane(mut t: Table<'_, '_>, d: &mut Diags<'_>) -> Option<DataplaneConfig> {
    let interfaces = t
        .required(
            d,
            "interfaces",
            "a list of { name = \"eth0\", mode = \"xdp\" }",
        )
        .and_then(|v| read_interfaces(&v, d));
    let max_sessions = or_default(
        t.get("max_sessions"),
        i64::from(idgate_common::DEFAULT_MAX_SESSIONS),
        |v| v.int(d, 1, MAX_SESSIONS_LIMIT),
    );
    let lifetime = or_default(
        t.get("max_session_lifetime"),
        DEFAULT_MAX_SESSION_LIFETIME,
        |v| {
            duration(
                &v,
                d,
                Duration::from_secs(60),
                Duration::from_secs(30 * 86_400),
            )
        },
    );
    let per_sec = or_default(t.get("events_per_sec"), 200, |v| {
        v.int(d, 0, idgate_common::MAX_EVENTS_PER_SEC as i64)
    });
    let burst = or_default(t.get("events_burst"), 400, |v| {
        v.int(d, 0, idgate_common::MAX_EVENT_BURST as i64)
    });
    let pin_dir = or_default(
        t.get("pin_dir"),
        Some(PathBuf::from(crate::dataplane::DEFAULT_PIN_DIR)),
        |v| match v.str(d)? {
            "" => Some(None),
            _ => absolute_path(&v, d).map(Some),
        },
    );
    let default_state = match &pin_dir {
        Some(Some(_)) => Some(PathBuf::from(super::DEFAULT_SESSION_STATE)),
        _ => None,
    };
    let session_state = or_default(t.get("session_state"), default_state, |v| {
        match v.str(d)? {
            "" => Some(None),
            _ => absolute_path(&v, d).map(Some),
        }
    });
    t.finish(d);
    Some(DataplaneConfig {
        interfaces: interfaces?,
        max_sessions: u32::try_from(max_sessions?).ok()?,
        max_session_lifetime: lifetime?,
        events_per_sec: u64::try_from(per_sec?).ok()?,
        events_burst: u64::try_from(burst?).ok()?,
        pin_dir: pin_dir?,
        session_state: session_state?,
    })
}

fn read_interfaces(v: &Val<'_, '_>, d: &mut Diags<'_>) -> Option<Vec<InterfaceConfig>> {
    let items = v.array(d)?;
    if items.is_empty() {
        v.error(
            d,
            "expected at least one interface: with none, nothing is enforced",
        );
        return None;
    }
    let mut out = Vec::new();
    let mut ok = true;
    let mut seen = BTreeSet::new();
    for item in items {
        let Some(mut t) = item.table(d) else {
            ok = false;
            continue;
        };
        let name = t.required(d, "name", "an interface name such as \"eth0\"").and_then(|v| {
            let s = v.str(d)?;
            // IFNAMSIZ is 16 with the NUL; '/' and whitespace are refused by the kernel.
            let valid = !s.is_empty()
                && s.len() <= 15
                && s != "."
                && s != ".."
                && !s.chars().any(|c| c == '/' || c == ':' || c.is_whitespace());
            if !valid {
                v.error(d, format!("expected an interface name (1 to 15 bytes, no '/', ':' or spaces), found {s:?}"));
                return None;
            }
            if !seen.insert(s.to_owned()) {
                v.error(d, format!("interface {s:?} is listed twice"));
                return None;
            }
            Some(s.to_owned())
        });
        let mode = or_default(t.get("mode"), AttachMode::Auto, |v| {
            const MODES: [(&str, AttachMode); 5] = [
                ("auto", AttachMode::Auto),
                ("xdp", AttachMode::Xdp),
                ("xdp-native", AttachMode::XdpNative),
                ("xdp-generic", AttachMode::XdpGeneric),
                ("tc", AttachMode::Tc),
            ];
            v.choice(d, &MODES.map(|m| m.0)).map(|i| MODES[i].1)
        });
        t.finish(d);
        match (name, mode) {
            (Some(name), Some(mode)) => out.push(InterfaceConfig { name, mode }),
            _ => ok = false,
        }
    }
    ok.then_some(out)
}

// ---------------------------------------------------------------------------------------------
// [[services]]

/// Services as read: the valid ones with their location (`None` if any entry was wrong), and
/// every declared name, so rules naming a broken service are not also reported as unknown.
/// Where a service is written: its table, and its `port` value (for the lock-out error).
struct ServiceLoc {
    path: String,
    span: Range<usize>,
    port_span: Range<usize>,
}

struct Services {
    valid: Option<Vec<(ServiceConfig, ServiceLoc)>>,
    declared: BTreeSet<String>,
}

fn read_services(root: &mut Table<'_, '_>, d: &mut Diags<'_>) -> Services {
    let mut out = Services {
        valid: None,
        declared: BTreeSet::new(),
    };
    let Some(v) = root.required(d, "services", "[[services]] tables, one per protected port")
    else {
        return out;
    };
    let Some(items) = v.array(d) else {
        return out;
    };
    if items.is_empty() {
        v.error(
            d,
            "expected at least one [[services]] entry: with none, nothing is protected",
        );
        return out;
    }
    if items.len() >= idgate_common::MAX_SERVICES as usize {
        v.error(
            d,
            format!(
                "{} services exceed the data plane's limit of {}",
                items.len(),
                idgate_common::MAX_SERVICES - 1
            ),
        );
    }
    let mut valid = Vec::new();
    let mut ok = true;
    let mut names = BTreeSet::new();
    let mut ports: BTreeMap<(Protocol, u16), String> = BTreeMap::new();
    for item in items {
        let Some(mut t) = item.table(d) else {
            ok = false;
            continue;
        };
        let name = t
            .required(d, "name", "a unique name such as \"api\"")
            .and_then(|v| {
                let n = name(&v, d)?;
                out.declared.insert(n.clone());
                if n == "any" {
                    v.error(d, "\"any\" is reserved: rules use it to mean every service");
                    return None;
                }
                if !names.insert(n.clone()) {
                    v.error(d, format!("service name {n:?} is used twice"));
                    return None;
                }
                Some(n)
            });
        let protocol = t
            .required(d, "protocol", "\"tcp\" or \"udp\"")
            .and_then(|v| v.choice(d, &["tcp", "udp"]))
            .map(|i| [Protocol::Tcp, Protocol::Udp][i]);
        let port_val = t.required(d, "port", "a port number 1..=65535");
        let port = port_val
            .as_ref()
            .and_then(|v| v.int(d, 1, 65_535))
            .and_then(|p| u16::try_from(p).ok());
        let action = or_default(t.get("action"), ServiceAction::Drop, |v| {
            v.choice(d, &["drop", "reset"])
                .map(|i| [ServiceAction::Drop, ServiceAction::Reset][i])
        });
        t.finish(d);
        if let (Some(proto), Some(port), Some(pv)) = (protocol, port, &port_val) {
            let label = name.clone().unwrap_or_else(|| item.path().to_owned());
            if let Some(first) = ports.get(&(proto, port)) {
                pv.error(
                    d,
                    format!("{port}/{proto} is already protected by service {first:?}"),
                );
                ok = false;
                continue;
            }
            ports.insert((proto, port), label);
        }
        match (name, protocol, port, action, port_val) {
            (Some(name), Some(protocol), Some(port), Some(action), Some(pv)) => valid.push((
                ServiceConfig {
                    name,
                    protocol,
                    port,
                    action,
                },
                ServiceLoc {
                    path: item.path().to_owned(),
                    span: item.span(),
                    port_span: pv.span(),
                },
            )),
            _ => ok = false,
        }
    }
    out.valid = ok.then_some(valid);
    out
}

// ---------------------------------------------------------------------------------------------
// [[issuers]]

struct Issuers {
    valid: Option<Vec<IssuerConfig>>,
    declared: BTreeSet<String>,
}

fn read_issuers(root: &mut Table<'_, '_>, d: &mut Diags<'_>) -> Issuers {
    let mut out = Issuers {
        valid: None,
        declared: BTreeSet::new(),
    };
    let Some(v) = root.required(
        d,
        "issuers",
        "[[issuers]] tables, one per identity provider",
    ) else {
        return out;
    };
    let Some(items) = v.array(d) else {
        return out;
    };
    if items.is_empty() {
        v.error(
            d,
            "expected at least one [[issuers]] entry: without one, no token can be verified",
        );
        return out;
    }
    let mut valid = Vec::new();
    let mut ok = true;
    for item in items {
        let Some(t) = item.table(d) else {
            ok = false;
            continue;
        };
        match read_issuer(t, d, &mut out.declared) {
            Some(i) => valid.push(i),
            None => ok = false,
        }
    }
    out.valid = ok.then_some(valid);
    out
}

fn read_issuer(
    mut t: Table<'_, '_>,
    d: &mut Diags<'_>,
    declared: &mut BTreeSet<String>,
) -> Option<IssuerConfig> {
    let issuer_val = t.required(
        d,
        "issuer",
        "the issuer URL, exactly as tokens carry it in `iss`",
    );
    let allow_http = or_default(t.get("allow_http"), false, |v| v.bool(d));
    let issuer = issuer_val.as_ref().and_then(|v| {
        let s = v.str(d)?;
        if !declared.insert(s.to_owned()) {
            v.error(d, format!("issuer {s:?} is configured twice"));
            return None;
        }
        check_issuer_url(v, s, allow_http.unwrap_or(false), d)?;
        Some(s.to_owned())
    });
    let audiences = t
        .required(d, "audiences", "a list of accepted `aud` values, such as [\"api://idgate\"]")
        .and_then(|v| {
            let items = v.array(d)?;
            if items.is_empty() {
                v.error(d, "expected at least one audience: without one, tokens minted for any other application would be accepted");
                return None;
            }
            let mut out = Vec::new();
            let mut ok = true;
            for item in items {
                match item.str(d) {
                    Some("") => {
                        item.error(d, "expected a non-empty audience");
                        ok = false;
                    }
                    Some(s) => out.push(s.to_owned()),
                    None => ok = false,
                }
            }
            ok.then_some(out)
        });
    let algorithms = or_default(t.get("algorithms"), vec!["RS256".to_owned()], |v| {
        let items = v.array(d)?;
        if items.is_empty() {
            v.error(
                d,
                format!("expected at least one of {}", ALGORITHMS.join(", ")),
            );
            return None;
        }
        let mut out: Vec<String> = Vec::new();
        let mut ok = true;
        for item in items {
            let Some(s) = item.str(d) else {
                ok = false;
                continue;
            };
            if ALGORITHMS.contains(&s) {
                if out.iter().any(|a| a == s) {
                    item.warn(d, format!("algorithm {s} is listed twice"));
                } else {
                    out.push(s.to_owned());
                }
            } else if s.eq_ignore_ascii_case("none") || s.to_ascii_uppercase().starts_with("HS") {
                item.error(
                    d,
                    format!(
                        "{s:?} is refused: unsigned and shared-secret (HMAC) tokens could be \
                         minted by anyone able to verify them; expected one of {}",
                        ALGORITHMS.join(", ")
                    ),
                );
                ok = false;
            } else {
                item.error(
                    d,
                    format!(
                        "unknown algorithm {s:?}: expected one of {}",
                        ALGORITHMS.join(", ")
                    ),
                );
                ok = false;
            }
        }
        ok.then_some(out)
    });
    let leeway = or_default(t.get("leeway"), Duration::from_secs(60), |v| {
        duration(&v, d, Duration::ZERO, MAX_LEEWAY)
    });
    let require_typ = or_default(t.get("require_typ_at_jwt"), false, |v| v.bool(d));
    let max_token_bytes = or_default(t.get("max_token_bytes"), 16_384, |v| {
        // The verifier's own ceiling: a file `check-config` accepts must not fail at `run`.
        v.int(d, 1_024, crate::identity::MAX_TOKEN_BYTES_LIMIT as i64)
    });
    let user_claim = or_default(t.get("user_claim"), "sub".to_owned(), |v| claim_path(&v, d));
    let group_claims = or_default(t.get("group_claims"), Vec::new(), |v| {
        let items = v.array(d)?;
        let mut out = Vec::new();
        let mut ok = true;
        for item in items {
            let Some(mut gt) = item.table(d) else {
                ok = false;
                continue;
            };
            let path = gt
                .required(
                    d,
                    "path",
                    "a dotted claim path such as \"groups\" or \"realm_access.roles\"",
                )
                .and_then(|v| claim_path(&v, d));
            let format = or_default(gt.get("format"), GroupClaimFormat::Array, |v| {
                v.choice(d, &["array", "space-separated"])
                    .map(|i| [GroupClaimFormat::Array, GroupClaimFormat::SpaceSeparated][i])
            });
            gt.finish(d);
            match (path, format) {
                (Some(path), Some(format)) => out.push(GroupClaim { path, format }),
                _ => ok = false,
            }
        }
        ok.then_some(out)
    });
    let jwks_refresh = or_default(t.get("jwks_refresh"), Duration::from_secs(15 * 60), |v| {
        duration(&v, d, Duration::from_secs(30), Duration::from_secs(86_400))
    });
    let ca_file = match t.get("ca_file") {
        None => Some(None),
        Some(v) => absolute_path(&v, d).map(Some),
    };
    if let (Some(true), Some(v), Some(i)) = (allow_http, t.get("allow_http"), &issuer)
        && i.starts_with("https://")
    {
        v.warn(d, "allow_http has no effect: the issuer URL is https");
    }
    t.finish(d);
    Some(IssuerConfig {
        issuer: issuer?,
        audiences: audiences?,
        algorithms: algorithms?,
        leeway: leeway?,
        require_typ_at_jwt: require_typ?,
        max_token_bytes: usize::try_from(max_token_bytes?).ok()?,
        user_claim: user_claim?,
        group_claims: group_claims?,
        jwks_refresh: jwks_refresh?,
        ca_file: ca_file?,
        allow_http: allow_http?,
    })
}

fn claim_path(v: &Val<'_, '_>, d: &mut Diags<'_>) -> Option<String> {
    let s = v.str(d)?;
    match policy::check_claim_path(s) {
        Ok(()) => Some(s.to_owned()),
        Err(e) => {
            v.error(d, e);
            None
        }
    }
}

fn check_issuer_url(v: &Val<'_, '_>, s: &str, allow_http: bool, d: &mut Diags<'_>) -> Option<()> {
    let url = match url::Url::parse(s) {
        Ok(u) => u,
        Err(e) => {
            v.error(d, format!("expected an issuer URL such as \"https://idp.example.com/realms/corp\", found {s:?} ({e})"));
            return None;
        }
    };
    if url.query().is_some()
        || url.fragment().is_some()
        || !url.username().is_empty()
        || url.password().is_some()
    {
        v.error(
            d,
            "an issuer URL has no query, fragment or credentials (OpenID Connect Discovery §3)",
        );
        return None;
    }
    let loopback = match url.host() {
        // A name could resolve anywhere; the verifier only trusts address literals to be local.
        Some(url::Host::Domain(_)) => false,
        Some(url::Host::Ipv4(a)) => a.is_loopback(),
        Some(url::Host::Ipv6(a)) => a.is_loopback(),
        None => false,
    };
    match url.scheme() {
        "https" => Some(()),
        "http" if allow_http && loopback => Some(()),
        "http" if allow_http => {
            v.error(d, "allow_http is only accepted for a loopback issuer (an address in 127.0.0.0/8, or ::1; not a name such as localhost): keys fetched over plain HTTP from elsewhere could be forged in transit");
            None
        }
        "http" => {
            v.error(d, "expected an https:// URL (plain http is only accepted for a loopback issuer with allow_http = true)");
            None
        }
        other => {
            v.error(
                d,
                format!("expected an https:// URL, found scheme {other:?}"),
            );
            None
        }
    }
}

// ---------------------------------------------------------------------------------------------
// [session_endpoint] and [admin]

fn read_session_endpoint(mut t: Table<'_, '_>, d: &mut Diags<'_>) -> Option<SessionEndpointConfig> {
    let listen = t
        .required(d, "listen", "an address and port such as \"0.0.0.0:8443\"")
        .and_then(|v| {
            v.parse::<SocketAddr>(
                d,
                "an address and port such as \"0.0.0.0:8443\" or \"[::]:8443\"",
            )
        });
    let cert_val = t.get("tls_cert");
    let key_val = t.get("tls_key");
    let cert = cert_val.as_ref().map(|v| absolute_path(v, d));
    let key = key_val.as_ref().map(|v| absolute_path(v, d));
    let tls = match (cert, key) {
        (None, None) => {
            if let Some(l) = &listen
                && !is_loopback_addr(l)
            {
                d.error(
                    &join(t.path(), "tls_cert"),
                    Some(t.span()),
                    format!(
                        "missing tls_cert and tls_key: without TLS, tokens would cross the \
                         network in clear; only a loopback listen address (behind a local \
                         TLS-terminating proxy) may omit them, and {l} is not loopback"
                    ),
                );
            }
            Some(None)
        }
        (Some(c), Some(k)) => Some(Some(TlsFiles { cert: c?, key: k? })),
        (Some(_), None) | (None, Some(_)) => {
            d.error(
                &join(t.path(), "tls_key"),
                Some(t.span()),
                "tls_cert and tls_key go together: set both or neither",
            );
            None
        }
    };
    let proxies = or_default(t.get("trusted_proxies"), Vec::new(), |v| {
        let items = v.array(d)?;
        let mut out = Vec::new();
        let mut ok = true;
        for item in items {
            match cidr(&item, d) {
                Some(n) => out.push(n),
                None => ok = false,
            }
        }
        ok.then_some(out)
    });
    let per_minute = or_default(t.get("failed_attempts_per_minute"), 10, |v| {
        v.int(d, 1, 100_000)
    });
    let burst = or_default(t.get("failed_attempts_burst"), 20, |v| v.int(d, 1, 100_000));
    t.finish(d);
    Some(SessionEndpointConfig {
        listen: listen?,
        tls: tls?,
        trusted_proxies: proxies?,
        failed_attempts_per_minute: u32::try_from(per_minute?).ok()?,
        failed_attempts_burst: u32::try_from(burst?).ok()?,
    })
}

fn read_admin(mut t: Table<'_, '_>, d: &mut Diags<'_>) -> Option<AdminConfig> {
    let socket = or_default(t.get("socket"), PathBuf::from(DEFAULT_ADMIN_SOCKET), |v| {
        absolute_path(&v, d)
    });
    let whois_value = t.get("whois_socket");
    let whois_socket = match &whois_value {
        None => socket
            .as_ref()
            .map(|s| AdminConfig::with_socket(s.clone()).whois_socket),
        Some(v) => match v.str(d) {
            Some("") => Some(None),
            Some(_) => absolute_path(v, d).map(Some),
            None => None,
        },
    };
    if let (Some(s), Some(Some(w))) = (&socket, &whois_socket)
        && s == w
    {
        let msg = "the whois socket (which answers whois only, to any local user) must not be \
                   the admin socket";
        match &whois_value {
            Some(v) => v.error(d, msg),
            None => d.error("admin.whois_socket", None, msg),
        }
    }
    let metrics = match t.get("metrics") {
        None => Some(None),
        Some(v) => v
            .parse::<SocketAddr>(d, "a loopback address and port such as \"127.0.0.1:9464\"")
            .and_then(|a| {
                if is_loopback_addr(&a) {
                    Some(Some(a))
                } else {
                    v.error(d, format!("metrics must listen on loopback (127.0.0.1 or [::1]), not {a}: they reveal who uses which service; expose them through a proxy if needed"));
                    None
                }
            }),
    };
    t.finish(d);
    Some(AdminConfig {
        socket: socket?,
        whois_socket: whois_socket?,
        metrics: metrics?,
    })
}

fn read_audit(mut t: Table<'_, '_>, d: &mut Diags<'_>) -> Option<AuditConfig> {
    const OUTPUTS: [&str; 3] = ["stdout", "file", "journald"];
    let output = or_default(t.get("output"), 0, |v| v.choice(d, &OUTPUTS));
    let path_val = t.get("path");
    let path = path_val.as_ref().map(|v| absolute_path(v, d));
    let span = t.span();
    let at = join(t.path(), "path");
    t.finish(d);
    match (output?, path) {
        (1, Some(p)) => Some(AuditConfig::File(p?)),
        (1, None) => {
            d.error(&at, Some(span), "output = \"file\" needs a path");
            None
        }
        (_, Some(_)) => {
            if let Some(v) = &path_val {
                v.error(d, "path is only for output = \"file\"");
            }
            None
        }
        (0, None) => Some(AuditConfig::Stdout),
        (_, None) => Some(AuditConfig::Journald),
    }
}

/// Refuses protecting the session endpoint's own port: nobody could present a token to open it.
fn check_lockout(
    ep: &SessionEndpointConfig,
    services: &[(ServiceConfig, ServiceLoc)],
    d: &mut Diags<'_>,
) {
    for (s, loc) in services {
        if s.protocol == Protocol::Tcp && s.port == ep.listen.port() {
            d.error(
                &join(&loc.path, "port"),
                Some(loc.port_span.clone()),
                format!(
                    "service {:?} protects tcp/{}, the session endpoint's own port: clients \
                     could never reach it to present a token, so nobody could get in",
                    s.name, s.port
                ),
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// [policy]

struct ReadRule {
    index: usize,
    rule: Rule,
    path: String,
    span: Range<usize>,
}

struct ReadPolicy {
    default: Option<Action>,
    rules: Vec<ReadRule>,
    rules_path: String,
    rules_span: Range<usize>,
}

fn read_policy(
    mut t: Table<'_, '_>,
    d: &mut Diags<'_>,
    services: &Services,
    issuers: &Issuers,
    lifetime: Duration,
) -> ReadPolicy {
    let default = t
        .required(d, "default", "\"drop\" or \"reset\" (it must be explicit)")
        .and_then(|v| {
            let i = v.choice(d, &["drop", "reset", "allow"])?;
            if i == 2 {
                v.error(d, "default = \"allow\" is refused: traffic no rule matches would pass, so the policy would enforce nothing it does not name; expected \"drop\" or \"reset\"");
                return None;
            }
            Some([Action::Drop, Action::Reset][i])
        });
    let mut out = ReadPolicy {
        default,
        rules: Vec::new(),
        rules_path: join(t.path(), "rules"),
        rules_span: t.span(),
    };
    if let Some(v) = t.get("rules")
        && let Some(items) = v.array(d)
    {
        out.rules_span = v.span();
        let mut names: BTreeSet<String> = BTreeSet::new();
        for (index, item) in items.into_iter().enumerate() {
            let Some(rt) = item.table(d) else { continue };
            if let Some(rule) = read_rule(rt, d, services, issuers, lifetime, &mut names) {
                out.rules.push(ReadRule {
                    index,
                    rule,
                    path: item.path().to_owned(),
                    span: item.span(),
                });
            }
        }
    }
    t.finish(d);
    out
}

fn read_rule(
    mut t: Table<'_, '_>,
    d: &mut Diags<'_>,
    services: &Services,
    issuers: &Issuers,
    global_lifetime: Duration,
    names: &mut BTreeSet<String>,
) -> Option<Rule> {
    let rule_name = t.required(d, "name", "a unique rule name").and_then(|v| {
        let n = name(&v, d)?;
        if !names.insert(n.clone()) {
            v.error(d, format!("rule name {n:?} is used twice: names must be unique, as logs and events report them"));
            return None;
        }
        Some(n)
    });
    let enabled = or_default(t.get("enabled"), true, |v| v.bool(d));
    let description = match t.get("description") {
        None => Some(None),
        Some(v) => v.str(d).map(|s| Some(s.to_owned())),
    };
    let issuer = match t.get("issuer") {
        None => Some(None),
        Some(v) => v.str(d).and_then(|s| {
            if issuers.declared.contains(s) {
                Some(Some(s.to_owned()))
            } else {
                let known: Vec<&str> = issuers.declared.iter().map(String::as_str).collect();
                v.error(
                    d,
                    format!(
                        "unknown issuer {s:?}: expected the URL of an [[issuers]] entry ({})",
                        known.join(", ")
                    ),
                );
                None
            }
        }),
    };
    let sources = or_default(t.get("sources"), vec![SourceMatcher::Any], |v| {
        let items = v.array(d)?;
        if items.is_empty() {
            v.error(d, "an empty sources list can never match; write [\"any\"] (or leave it out) for no identity condition");
            return None;
        }
        let mut out = Vec::new();
        let mut ok = true;
        for item in &items {
            let Some(s) = item.str(d) else {
                ok = false;
                continue;
            };
            match s.parse::<SourceMatcher>() {
                Ok(m) => out.push(m),
                Err(e) => {
                    item.error(d, e);
                    ok = false;
                }
            }
        }
        if ok && out.len() > 1 && out.contains(&SourceMatcher::Any) {
            v.error(d, "\"any\" cannot be combined with other sources: it already matches everything they would");
            return None;
        }
        ok.then_some(out)
    });
    let source_cidrs = or_default(t.get("source_cidrs"), Vec::new(), |v| {
        let items = v.array(d)?;
        let mut out = Vec::new();
        let mut ok = true;
        for item in &items {
            match cidr(item, d) {
                Some(n) => out.push(n),
                None => ok = false,
            }
        }
        ok.then_some(out)
    });
    let rule_services = t
        .required(d, "services", "a list of service names, or [\"any\"]")
        .and_then(|v| {
            let items = v.array(d)?;
            if items.is_empty() {
                v.error(d, "an empty services list can never match; name services, or write [\"any\"]");
                return None;
            }
            let mut out = Vec::new();
            let mut ok = true;
            for item in &items {
                let Some(s) = item.str(d) else {
                    ok = false;
                    continue;
                };
                if s != "any" && !services.declared.contains(s) {
                    let known: Vec<&str> = services.declared.iter().map(String::as_str).collect();
                    item.error(d, format!("unknown service {s:?}: expected \"any\" or one of {}", known.join(", ")));
                    ok = false;
                } else if out.iter().any(|x| x == s) {
                    item.warn(d, format!("service {s:?} is listed twice"));
                } else {
                    out.push(s.to_owned());
                }
            }
            if !ok {
                return None;
            }
            if out.iter().any(|s| s == "any") {
                if out.len() > 1 {
                    v.error(d, "\"any\" cannot be combined with service names: it already means every service");
                    return None;
                }
                return Some(ServiceSelector::Any);
            }
            Some(ServiceSelector::Named(out))
        });
    let action = t
        .required(d, "action", "\"allow\", \"drop\" or \"reset\"")
        .and_then(|v| v.choice(d, &["allow", "drop", "reset"]))
        .map(|i| [Action::Allow, Action::Drop, Action::Reset][i]);
    let lifetime_val = t.get("max_session_lifetime");
    let lifetime = match &lifetime_val {
        None => Some(None),
        Some(v) => duration(
            v,
            d,
            Duration::from_secs(60),
            Duration::from_secs(30 * 86_400),
        )
        .map(Some),
    };
    let idle_val = t.get("idle_timeout");
    let idle = match &idle_val {
        None => Some(None),
        Some(v) => duration(
            v,
            d,
            Duration::from_secs(60),
            Duration::from_secs(30 * 86_400),
        )
        .map(Some),
    };
    let log = or_default(t.get("log"), true, |v| v.bool(d));
    t.finish(d);

    if let (Some(a), Some(Some(l)), Some(v)) = (action, lifetime, &lifetime_val) {
        if a != Action::Allow {
            v.warn(
                d,
                format!("max_session_lifetime has no effect on a {a} rule"),
            );
        } else if l > global_lifetime {
            v.warn(
                d,
                format!(
                    "{} exceeds [dataplane] max_session_lifetime ({}); sessions are capped at that",
                    format_duration(l),
                    format_duration(global_lifetime)
                ),
            );
        }
    }
    if let (Some(a), Some(Some(i)), Some(v)) = (action, idle, &idle_val) {
        let cap = lifetime
            .flatten()
            .unwrap_or(global_lifetime)
            .min(global_lifetime);
        if a != Action::Allow {
            v.warn(d, format!("idle_timeout has no effect on a {a} rule"));
        } else if i >= cap {
            v.warn(d, format!("idle_timeout {} is not shorter than the session lifetime ({}), so it never applies", format_duration(i), format_duration(cap)));
        }
    }

    Some(Rule {
        name: rule_name?,
        enabled: enabled?,
        description: description?,
        issuer: issuer?,
        sources: sources?,
        source_cidrs: source_cidrs?,
        services: rule_services?,
        action: action?,
        max_session_lifetime: lifetime?,
        idle_timeout: idle?,
        log: log?,
    })
}

/// Runs the policy analysis (static-rule compilation, shadowing, services nothing allows) on the
/// valid rules and turns its findings into diagnostics.
fn analyse_policy(p: &ReadPolicy, services: &Services, lifetime: Duration, d: &mut Diags<'_>) {
    let Some(svcs) = &services.valid else { return };
    let configs: Vec<ServiceConfig> = svcs.iter().map(|(s, _)| s.clone()).collect();
    let policy = Policy::build(
        &configs,
        p.rules.iter().map(|r| (r.index, &r.rule)),
        p.default.unwrap_or(Action::Drop),
        lifetime,
    );
    let analysis = policy.analyse();
    for f in analysis.findings {
        let (path, span) = match f.subject {
            Subject::Rule(i) => match p.rules.iter().find(|r| r.index == i) {
                Some(r) => (r.path.clone(), r.span.clone()),
                None => continue,
            },
            Subject::Service(i) => match svcs.get(i) {
                Some((_, loc)) => (loc.path.clone(), loc.span.clone()),
                None => continue,
            },
        };
        match f.severity {
            Severity::Error => d.error(&path, Some(span), f.message),
            Severity::Warning => d.warn(&path, Some(span), f.message),
        }
    }
    let limit = idgate_common::MAX_CIDR_RULES as usize;
    for action in [CidrAction::Allow, CidrAction::Deny] {
        let n = analysis
            .entries
            .iter()
            .filter(|e| e.action == action)
            .count();
        if n > limit {
            d.error(
                &p.rules_path,
                Some(p.rules_span.clone()),
                format!("the rules compile to {n} kernel CIDR {action:?} entries; the data plane holds at most {limit}"),
            );
        }
    }
}
