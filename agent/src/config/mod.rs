//! The configuration file (TOML; default path [`DEFAULT_PATH`], `--config` overrides).
//!
//! Reading never stops at the first problem and never falls back to a default for a value that
//! is present but wrong: [`Config::parse`] returns either a valid configuration with its warnings,
//! or [`ConfigErrors`] listing every error, each with its TOML path (`services[2].port`), its line
//! and column, and what was expected. Unknown keys are errors.
//!
//! **Durations** are strings of one or more `<integer><unit>` groups, largest unit first, with
//! units `d`, `h`, `m`, `s`: `"90s"`, `"15m"`, `"12h"`, `"1h30m"`. A bare number is refused, so
//! that nobody has to guess whether it means seconds or minutes.
//!
//! `idgate.example.toml` next to `Cargo.toml` shows and explains every section.

mod parse;
mod reader;
#[cfg(test)]
mod tests;
mod userid;

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use serde::Serialize;
use thiserror::Error;

use crate::{
    dataplane::{AttachMode, CidrRule, LoadOptions, Protocol, Service, ServiceAction},
    policy::{Action, Policy, Rule},
};

/// Where the agent looks for its configuration unless told otherwise.
pub const DEFAULT_PATH: &str = "/etc/idgate/idgate.toml";

/// The admin socket's default path.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/idgate/admin.sock";

/// The whois socket's file name, beside the admin socket unless configured otherwise.
pub const WHOIS_SOCKET_NAME: &str = "whois.sock";

/// Where the owners of pinned sessions are kept by default (when `pin_dir` pins anything).
pub const DEFAULT_SESSION_STATE: &str = "/run/idgate/sessions.jsonl";

/// Signature algorithms an issuer may use. Never `none` or HMAC (`HS*`): with a shared secret,
/// anyone able to verify tokens could also mint them.
pub const ALGORITHMS: &[&str] = &[
    "RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "PS384", "PS512", "EdDSA",
];

/// One problem in a configuration, with where it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    /// TOML path of the offending key or value (`services[2].port`); empty for the document.
    pub path: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column (in characters), when known.
    pub column: Option<usize>,
    /// What is wrong and what was expected.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let (Some(l), Some(c)) = (self.line, self.column) {
            write!(f, "{l}:{c}: ")?;
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// Every error found in a configuration.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub struct ConfigErrors(pub Vec<Diagnostic>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(
            f,
            "{n} configuration error{}:",
            if n == 1 { "" } else { "s" }
        )?;
        for d in &self.0 {
            write!(f, "\n  {d}")?;
        }
        Ok(())
    }
}

/// Why a configuration file could not be used.
#[derive(Debug, Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("reading {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file was read and is not a valid configuration.
    #[error("{}: {errors}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every error in it.
        errors: ConfigErrors,
    },
}

/// A valid configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// `[dataplane]`: where and how the programs run.
    pub dataplane: DataplaneConfig,
    /// `[[services]]`: the protected ports, ids 1.. in file order.
    pub services: Vec<ServiceConfig>,
    /// `[[issuers]]`: the identity providers whose tokens are accepted.
    pub issuers: Vec<IssuerConfig>,
    /// `[session_endpoint]`: where clients present tokens.
    pub session_endpoint: SessionEndpointConfig,
    /// `[admin]`: the local control socket and metrics.
    pub admin: AdminConfig,
    /// `[audit]`: where the JSON audit stream goes.
    pub audit: AuditConfig,
    /// `[policy]`: the default action and the ordered rules.
    pub policy: PolicyConfig,
    /// `[userid]`: the Palo Alto firewalls told who is behind each address (`None`: none).
    pub userid: Option<UserIdConfig>,
}

/// `[userid]`: User-ID updates to Palo Alto firewalls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserIdConfig {
    /// `[[userid.firewalls]]`: where updates go (each gets every update).
    pub firewalls: Vec<FirewallConfig>,
    /// Whether the user's groups are registered as user tags, and with which prefix.
    pub register_tags: Option<TagConfig>,
    /// Entries one request carries at most.
    pub batch_size: usize,
    /// Updates waiting per firewall; beyond it the oldest are dropped (and counted).
    pub queue_size: usize,
    /// How long an update waits for others to share its request.
    pub flush_interval: Duration,
    /// How long one request may take.
    pub request_timeout: Duration,
    /// The longest wait between retries of a failing firewall.
    pub max_backoff: Duration,
}

/// `register_tags`: user tags from groups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TagConfig {
    /// Put before each group name (`""`: the group names as they are).
    pub prefix: String,
}

/// One `[[userid.firewalls]]` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FirewallConfig {
    /// `https://host[:port]`, without a trailing slash.
    pub url: String,
    /// The file holding the API key (read at start; never logged).
    pub api_key_file: PathBuf,
    /// CA bundle for the firewall's certificate, instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// The virtual system the mappings belong to (`vsys1`), if not the default.
    pub vsys: Option<String>,
}

/// `[dataplane]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataplaneConfig {
    /// Interfaces to enforce on (at least one).
    pub interfaces: Vec<InterfaceConfig>,
    /// Capacity of the sessions map.
    pub max_sessions: u32,
    /// Upper bound on any session's lifetime.
    pub max_session_lifetime: Duration,
    /// Events per second each CPU may emit.
    pub events_per_sec: u64,
    /// Burst of events each CPU may emit.
    pub events_burst: u64,
    /// Where maps, programs and links are pinned (`pin_dir`, default `/sys/fs/bpf/idgate`;
    /// `""` pins nothing, and enforcement then ends with the agent).
    pub pin_dir: Option<PathBuf>,
    /// Where the owners of the pinned sessions are kept for the next run
    /// (`session_state`, default [`DEFAULT_SESSION_STATE`] when `pin_dir` pins, else none;
    /// `""`: nowhere, and a restart then removes the sessions it finds, as it cannot name them).
    pub session_state: Option<PathBuf>,
}

impl AdminConfig {
    /// The default admin configuration: the admin socket at [`DEFAULT_ADMIN_SOCKET`], the whois
    /// socket beside it, no metrics.
    pub fn with_socket(socket: PathBuf) -> AdminConfig {
        AdminConfig {
            whois_socket: Some(socket.with_file_name(WHOIS_SOCKET_NAME)),
            socket,
            metrics: None,
        }
    }
}

impl DataplaneConfig {
    /// The data plane's load-time settings.
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            max_sessions: self.max_sessions,
            events_per_sec: self.events_per_sec,
            events_burst: self.events_burst,
            pin_dir: self.pin_dir.clone(),
        }
    }
}

/// One `[[dataplane.interfaces]]` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceConfig {
    /// Interface name (`eth0`).
    pub name: String,
    /// How to attach.
    pub mode: AttachMode,
}

/// One `[[services]]` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceConfig {
    /// Unique name, used by rules.
    pub name: String,
    /// Transport protocol.
    pub protocol: Protocol,
    /// Destination port.
    pub port: u16,
    /// What the kernel does with traffic nothing lets through.
    pub action: ServiceAction,
}

/// How a group claim is laid out in the token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupClaimFormat {
    /// A JSON array of strings.
    Array,
    /// One string, names separated by spaces.
    SpaceSeparated,
}

/// One `group_claims` entry of an issuer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupClaim {
    /// Dotted path to the claim (`realm_access.roles`).
    pub path: String,
    /// How the claim is laid out.
    pub format: GroupClaimFormat,
}

/// One `[[issuers]]` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuerConfig {
    /// The issuer URL, exactly as tokens carry it in `iss`.
    pub issuer: String,
    /// Accepted `aud` values (at least one).
    pub audiences: Vec<String>,
    /// Accepted signature algorithms (from [`ALGORITHMS`]).
    pub algorithms: Vec<String>,
    /// Clock skew tolerated on `exp`/`nbf`/`iat`.
    pub leeway: Duration,
    /// Whether the token header must say `typ: at+jwt` (RFC 9068).
    pub require_typ_at_jwt: bool,
    /// Tokens longer than this are refused before any parsing.
    pub max_token_bytes: usize,
    /// Dotted path of the claim naming the user.
    pub user_claim: String,
    /// Claims holding group names.
    pub group_claims: Vec<GroupClaim>,
    /// How often the signing keys are fetched again.
    pub jwks_refresh: Duration,
    /// CA bundle for the issuer's TLS, instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// Whether plain `http://` is accepted (only for loopback issuers, e.g. a local test IdP).
    pub allow_http: bool,
}

/// The certificate and key of the session endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// `[session_endpoint]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionEndpointConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// TLS files; `None` only on a loopback address behind a TLS-terminating proxy.
    pub tls: Option<TlsFiles>,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Failed token presentations allowed per source address and minute.
    pub failed_attempts_per_minute: u32,
    /// Burst of failed presentations per source address.
    pub failed_attempts_burst: u32,
}

/// `[admin]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminConfig {
    /// The admin socket's path.
    pub socket: PathBuf,
    /// The read-only whois socket for applications (`whois_socket`, default `whois.sock` beside
    /// the admin socket; `""`: none).
    pub whois_socket: Option<PathBuf>,
    /// Metrics listen address (loopback only); `None` disables metrics.
    pub metrics: Option<SocketAddr>,
}

/// `[audit]`: where the audit stream (JSON lines) goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum AuditConfig {
    /// Standard output (the default; diagnostic logs go to standard error).
    #[default]
    Stdout,
    /// Appended to this file (created with mode 0640, reopened after a failed write).
    File(PathBuf),
    /// The systemd journal's native socket.
    Journald,
}

/// `[policy]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyConfig {
    /// What evaluation reports when no rule matches (drop or reset; never allow).
    pub default: Action,
    /// The rules, in order.
    pub rules: Vec<Rule>,
}

impl Config {
    /// Reads and validates the file at `path`; returns the configuration and its warnings.
    pub fn load(path: &Path) -> Result<(Config, Vec<Diagnostic>), LoadError> {
        let src = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&src).map_err(|errors| LoadError::Invalid {
            path: path.to_owned(),
            errors,
        })
    }

    /// Parses and validates a configuration; returns it with its warnings, or every error.
    pub fn parse(src: &str) -> Result<(Config, Vec<Diagnostic>), ConfigErrors> {
        parse::parse(src)
    }

    /// The compiled policy.
    pub fn policy(&self) -> Policy {
        Policy::new(self)
    }

    /// The protected services for the data plane, ids 1.. in file order.
    pub fn dataplane_services(&self) -> Vec<Service> {
        self.policy().dataplane_services()
    }

    /// The kernel CIDR entries compiled from static rules (see [`Policy::cidr_rules`]).
    pub fn cidr_rules(&self) -> Vec<CidrRule> {
        self.policy().cidr_rules()
    }
}

/// Parses a duration such as `"90s"`, `"15m"`, `"12h"`, `"1d"` or `"1h30m"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    const UNITS: [(char, u64); 4] = [('d', 86_400), ('h', 3_600), ('m', 60), ('s', 1)];
    let bad = || {
        format!(
            "expected a duration such as \"90s\", \"15m\", \"12h\" or \"1h30m\" \
             (units d, h, m, s, largest first), found {s:?}"
        )
    };
    let mut rest = s;
    let mut total: u64 = 0;
    let mut next_unit = 0;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        let unit = rest[digits..].chars().next().ok_or_else(bad)?;
        let pos = UNITS[next_unit..]
            .iter()
            .position(|(u, _)| *u == unit)
            .ok_or_else(bad)?
            + next_unit;
        total = n
            .checked_mul(UNITS[pos].1)
            .and_then(|x| total.checked_add(x))
            .ok_or_else(bad)?;
        next_unit = pos + 1;
        rest = &rest[digits + 1..];
    }
    Ok(Duration::from_secs(total))
}

/// Formats a duration the way the configuration writes them (`"1h30m"`), whole seconds.
pub fn format_duration(d: Duration) -> String {
    let mut secs = d.as_secs();
    if secs == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
        if secs >= size {
            out.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    out
}
