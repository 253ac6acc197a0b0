//! The audit trail: who got (or lost) access to what, and why.
//!
//! Every audit record goes through [`AuditLog::record`], which
//!
//! - emits it as a structured `tracing` event with target [`TARGET`] (diagnostic logs, and what
//!   tests capture), and
//! - writes it to the audit stream: one JSON object per line, `{"time": RFC 3339 with
//!   milliseconds, "event": ..., fields...}`, to standard output, an append-only file or the
//!   systemd journal (`[audit] output`), separate from the diagnostic logs on standard error.
//!
//! Field names follow Palo Alto's traffic and User-ID logs where one fits (`src`, `srcuser`,
//! `dst`, `dport`, `proto`, `app`, `rule`, `action`, `session_end_reason`). Absent optional
//! fields are written as `null`, so every line of one event has the same keys.
//!
//! Volume: flow records are bounded by the caller ([`FlowBudget`]); what it leaves out is
//! reported in a `flows-suppressed` line of its own and counted ([`AuditLog::flows_suppressed`]).
//!
//! **Journal.** `output = "journald"` sends each record as one datagram to the journal's native
//! socket (`/run/systemd/journal/socket`): `MESSAGE` (for people), `PRIORITY=6`,
//! `SYSLOG_IDENTIFIER=idgate`, `IDGATE_EVENT` and `IDGATE_AUDIT` (the JSON line). If the socket
//! cannot be reached at start-up, `idgate run` refuses to start (exit 2) rather than fall back:
//! an audit trail that silently goes elsewhere is one nobody reads.

use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    net::IpAddr,
    net::SocketAddr,
    os::unix::{fs::OpenOptionsExt as _, net::UnixDatagram},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};
use thiserror::Error;

use super::{IdentityRecord, ServiceInfo, time::rfc3339};
use crate::config::AuditConfig;

/// The journal's native socket.
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// Target of every audit event.
pub const TARGET: &str = "idgate::audit";

/// One audit record.
#[derive(Debug)]
pub enum AuditEvent<'a> {
    /// A verified login's decision for one service.
    Login {
        /// The client.
        src: IpAddr,
        /// Who.
        identity: &'a IdentityRecord,
        /// The service.
        service: &'a ServiceInfo,
        /// `allow`, `drop` or `reset`.
        action: &'a str,
        /// The rule that decided (`None`: the policy default).
        rule: Option<(&'a str, u32)>,
        /// With a session: when it ends.
        expires_at: Option<SystemTime>,
    },
    /// A token presentation that was refused before the policy was consulted.
    LoginFailed {
        /// The client.
        src: IpAddr,
        /// The TCP peer, when it differs from `src` (a trusted proxy).
        peer: Option<IpAddr>,
        /// The machine-readable reason.
        reason: &'a str,
        /// The HTTP status answered.
        status: u16,
    },
    /// Another identity logged in from a source that had one.
    Replaced {
        /// The source.
        src: IpAddr,
        /// Who was there.
        old: &'a IdentityRecord,
        /// Who is there now.
        new: &'a IdentityRecord,
    },
    /// A session (one source, one service) ended.
    SessionEnd {
        /// The client.
        src: IpAddr,
        /// Whose it was.
        identity: &'a IdentityRecord,
        /// The service.
        service: &'a ServiceInfo,
        /// The rule that had allowed it.
        rule: (&'a str, u32),
        /// Why it ended.
        reason: &'a str,
    },
    /// A flow the data plane reported (refused, or a new allowed connection).
    Flow {
        /// `allow` or `deny`.
        action: &'a str,
        /// The data plane's reason (`no-session`, `expired`, `session`, ...).
        reason: &'a str,
        /// Whether a RST was sent.
        reset: bool,
        /// Client address and port.
        src: SocketAddr,
        /// Destination address and port.
        dst: SocketAddr,
        /// `tcp`, `udp` or the protocol number.
        proto: &'a str,
        /// The service's name, if the flow was to one.
        app: Option<&'a str>,
        /// The user, when the flow carried a session.
        srcuser: Option<&'a str>,
        /// The rule, when one decided.
        rule: Option<&'a str>,
    },
    /// Flow records left out in the last interval to bound the log's volume.
    FlowsSuppressed {
        /// How many.
        count: u64,
    },
    /// A configuration reload, applied or refused.
    Reload {
        /// What asked for it: `sighup`, `admin` (`POST /v1/reload`) or `api`.
        trigger: &'a str,
        /// The file read, if any.
        path: Option<&'a std::path::Path>,
        /// `applied` or `refused`.
        result: &'a str,
        /// Sessions the new policy ended.
        revoked: usize,
        /// Sessions still allowed whose rule or expiry changed.
        updated: usize,
        /// Why it was refused (empty when applied).
        errors: &'a [String],
    },
}

/// Told of every audit record as it is recorded, on the recording thread (which may hold the
/// session lock): it must return at once, never wait.
pub trait AuditObserver: Send + Sync + std::fmt::Debug {
    /// One record.
    fn observe(&self, e: &AuditEvent<'_>);
}

/// Why the audit stream could not be opened.
#[derive(Debug, Error)]
pub enum AuditError {
    /// The audit file could not be opened for appending.
    #[error("audit file {}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The journal's socket could not be reached.
    #[error(
        "audit output journald: {JOURNAL_SOCKET}: {0} (is systemd-journald running? use output \
         = \"file\" or \"stdout\" otherwise)"
    )]
    Journal(#[source] std::io::Error),
}

/// Where the JSON lines go.
enum Sink {
    /// Nowhere (tracing only; unit tests).
    None,
    Stdout,
    File {
        path: PathBuf,
        file: Mutex<Option<File>>,
    },
    Journald(Mutex<UnixDatagram>),
}

struct Inner {
    sink: Sink,
    flows_suppressed: AtomicU64,
    write_errors: AtomicU64,
    /// Whether the last write failed (errors are logged once per streak).
    failing: AtomicBool,
    /// Told of every record (User-ID).
    observer: OnceLock<Arc<dyn AuditObserver>>,
}

/// The audit trail: cheap to clone, shared by everything that audits.
#[derive(Clone)]
pub struct AuditLog(Arc<Inner>);

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sink = match &self.0.sink {
            Sink::None => "none",
            Sink::Stdout => "stdout",
            Sink::File { .. } => "file",
            Sink::Journald(_) => "journald",
        };
        f.debug_struct("AuditLog")
            .field("sink", &sink)
            .finish_non_exhaustive()
    }
}

impl Default for AuditLog {
    /// Records go to `tracing` only.
    fn default() -> Self {
        Self::with_sink(Sink::None)
    }
}

impl AuditLog {
    fn with_sink(sink: Sink) -> Self {
        Self(Arc::new(Inner {
            sink,
            flows_suppressed: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            observer: OnceLock::new(),
        }))
    }

    /// Tells `observer` of every record from now on, in every clone of this log. Only one
    /// observer can be set; `false` if one was already.
    pub fn set_observer(&self, observer: Arc<dyn AuditObserver>) -> bool {
        self.0.observer.set(observer).is_ok()
    }

    /// Tells the observer of `e` without writing it to the stream (for session changes the
    /// policy asked not to log, which the observer still has to know of).
    pub fn notify(&self, e: &AuditEvent<'_>) {
        if let Some(o) = self.0.observer.get() {
            o.observe(e);
        }
    }

    /// Opens the stream `config` names: the file is created (mode 0640) or appended to; the
    /// journal's socket must be reachable.
    pub fn open(config: &AuditConfig) -> Result<Self, AuditError> {
        let sink = match config {
            AuditConfig::Stdout => Sink::Stdout,
            AuditConfig::File(path) => Sink::File {
                file: Mutex::new(Some(open_append(path).map_err(|source| {
                    AuditError::File {
                        path: path.clone(),
                        source,
                    }
                })?)),
                path: path.clone(),
            },
            AuditConfig::Journald => {
                Sink::Journald(Mutex::new(connect_journal().map_err(AuditError::Journal)?))
            }
        };
        Ok(Self::with_sink(sink))
    }

    /// Flow records left out so far (the sum of every `flows-suppressed` record).
    pub fn flows_suppressed(&self) -> u64 {
        self.0.flows_suppressed.load(Ordering::Relaxed)
    }

    /// Records that could not be written to the stream.
    pub fn write_errors(&self) -> u64 {
        self.0.write_errors.load(Ordering::Relaxed)
    }

    /// Writes one audit record: a `tracing` event and a line of the audit stream.
    pub fn record(&self, e: &AuditEvent<'_>) {
        if let AuditEvent::FlowsSuppressed { count } = e {
            self.0.flows_suppressed.fetch_add(*count, Ordering::Relaxed);
        }
        self.notify(e);
        trace(e);
        if matches!(self.0.sink, Sink::None) {
            return;
        }
        let line = json_line(SystemTime::now(), e);
        let result = match &self.0.sink {
            Sink::None => Ok(()),
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(line.as_bytes())
                    .and_then(|()| out.write_all(b"\n"))
                    .and_then(|()| out.flush())
            }
            Sink::File { path, file } => write_file(path, file, &line),
            Sink::Journald(socket) => write_journal(socket, e, &line),
        };
        match result {
            Ok(()) => {
                if self.0.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("writing the audit stream works again");
                }
            }
            Err(err) => {
                self.0.write_errors.fetch_add(1, Ordering::Relaxed);
                if !self.0.failing.swap(true, Ordering::Relaxed) {
                    tracing::error!(error = %err, "AUDIT RECORDS LOST: writing the audit stream failed");
                }
            }
        }
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
}

/// Appends `line`; after a failure, reopens the file (it may have been rotated away or its
/// disk remounted) and tries once more.
fn write_file(path: &Path, file: &Mutex<Option<File>>, line: &str) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(line.len() + 1);
    buf.extend_from_slice(line.as_bytes());
    buf.push(b'\n');
    let mut file = file.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(f) = file.as_mut()
        && f.write_all(&buf).is_ok()
    {
        return Ok(());
    }
    *file = None;
    let mut f = open_append(path)?;
    f.write_all(&buf)?;
    *file = Some(f);
    Ok(())
}

fn connect_journal() -> std::io::Result<UnixDatagram> {
    let s = UnixDatagram::unbound()?;
    s.connect(JOURNAL_SOCKET)?;
    s.set_write_timeout(Some(Duration::from_millis(200)))?;
    Ok(s)
}

/// Sends one record to the journal; after a failure, connects again (journald restarted) and
/// tries once more.
fn write_journal(
    socket: &Mutex<UnixDatagram>,
    e: &AuditEvent<'_>,
    line: &str,
) -> std::io::Result<()> {
    let datagram = journal_datagram(&message(e), event_name(e), line);
    let mut socket = socket.lock().unwrap_or_else(|p| p.into_inner());
    if socket.send(&datagram).is_ok() {
        return Ok(());
    }
    *socket = connect_journal()?;
    socket.send(&datagram).map(|_| ())
}

/// The journal's native protocol: `KEY=value\n` per field, or for a value holding a newline
/// `KEY\n`, its length as 64-bit little endian, the value and `\n`.
pub fn journal_datagram(message: &str, event: &str, json_line: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(json_line.len() + message.len() + 128);
    for (key, value) in [
        ("MESSAGE", message),
        ("PRIORITY", "6"),
        ("SYSLOG_IDENTIFIER", "idgate"),
        ("IDGATE_EVENT", event),
        ("IDGATE_AUDIT", json_line),
    ] {
        out.extend_from_slice(key.as_bytes());
        if value.contains('\n') {
            out.push(b'\n');
            out.extend_from_slice(&(value.len() as u64).to_le_bytes());
        } else {
            out.push(b'=');
        }
        out.extend_from_slice(value.as_bytes());
        out.push(b'\n');
    }
    out
}

/// RFC 3339 UTC with milliseconds (`2025-01-31T12:00:00.123Z`).
pub fn rfc3339_millis(when: SystemTime) -> String {
    let whole = rfc3339(when);
    let millis = when
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_millis());
    format!("{}.{millis:03}Z", whole.trim_end_matches('Z'))
}

/// The record's `event` value.
pub fn event_name(e: &AuditEvent<'_>) -> &'static str {
    match e {
        AuditEvent::Login { .. } => "login",
        AuditEvent::LoginFailed { .. } => "login-failed",
        AuditEvent::Replaced { .. } => "identity-replaced",
        AuditEvent::SessionEnd { .. } => "session-end",
        AuditEvent::Flow { .. } => "flow",
        AuditEvent::FlowsSuppressed { .. } => "flows-suppressed",
        AuditEvent::Reload { .. } => "config-reload",
    }
}

/// A one-line summary for people (the journal's `MESSAGE`).
fn message(e: &AuditEvent<'_>) -> String {
    match e {
        AuditEvent::Login {
            src,
            identity,
            service,
            action,
            ..
        } => format!(
            "login {action}: {} at {src} to {}",
            identity.user, service.name
        ),
        AuditEvent::LoginFailed { src, reason, .. } => format!("login refused at {src}: {reason}"),
        AuditEvent::Replaced { src, old, new } => {
            format!("{} replaces {} at {src}", new.user, old.user)
        }
        AuditEvent::SessionEnd {
            src,
            identity,
            service,
            reason,
            ..
        } => format!(
            "session end ({reason}): {} at {src} to {}",
            identity.user, service.name
        ),
        AuditEvent::Flow {
            action,
            reason,
            src,
            dst,
            ..
        } => format!("flow {action} ({reason}): {src} -> {dst}"),
        AuditEvent::FlowsSuppressed { count } => format!("{count} flow records suppressed"),
        AuditEvent::Reload {
            trigger, result, ..
        } => format!("configuration reload ({trigger}) {result}"),
    }
}

/// The record's fields after `time` and `event`, in order.
fn fields(e: &AuditEvent<'_>) -> Vec<(&'static str, Value)> {
    match e {
        AuditEvent::Login {
            src,
            identity,
            service,
            action,
            rule,
            expires_at,
        } => vec![
            ("src", json!(src)),
            ("srcuser", json!(identity.user)),
            ("subject", json!(identity.subject)),
            ("issuer", json!(identity.issuer)),
            ("groups", json!(identity.groups)),
            ("identity_id", json!(identity.id)),
            ("app", json!(service.name)),
            ("proto", json!(service.protocol.to_string())),
            ("dport", json!(service.port)),
            ("action", json!(action)),
            ("rule", json!(rule.map_or("(default)", |r| r.0))),
            ("rule_id", json!(rule.map_or(0, |r| r.1))),
            ("expires", json!(expires_at.map(rfc3339))),
        ],
        AuditEvent::LoginFailed {
            src,
            peer,
            reason,
            status,
        } => vec![
            ("src", json!(src)),
            ("peer", json!(peer)),
            ("reason", json!(reason)),
            ("status", json!(status)),
        ],
        AuditEvent::Replaced { src, old, new } => vec![
            ("src", json!(src)),
            ("srcuser", json!(new.user)),
            ("issuer", json!(new.issuer)),
            ("previous_user", json!(old.user)),
            ("previous_issuer", json!(old.issuer)),
        ],
        AuditEvent::SessionEnd {
            src,
            identity,
            service,
            rule,
            reason,
        } => vec![
            ("src", json!(src)),
            ("srcuser", json!(identity.user)),
            ("issuer", json!(identity.issuer)),
            ("identity_id", json!(identity.id)),
            ("app", json!(service.name)),
            ("proto", json!(service.protocol.to_string())),
            ("dport", json!(service.port)),
            ("rule", json!(rule.0)),
            ("rule_id", json!(rule.1)),
            ("session_end_reason", json!(reason)),
        ],
        AuditEvent::Flow {
            action,
            reason,
            reset,
            src,
            dst,
            proto,
            app,
            srcuser,
            rule,
        } => vec![
            ("action", json!(action)),
            ("reason", json!(reason)),
            ("reset", json!(reset)),
            ("src", json!(src.ip())),
            ("sport", json!(src.port())),
            ("dst", json!(dst.ip())),
            ("dport", json!(dst.port())),
            ("proto", json!(proto)),
            ("app", json!(app)),
            ("srcuser", json!(srcuser)),
            ("rule", json!(rule)),
        ],
        AuditEvent::FlowsSuppressed { count } => vec![("count", json!(count))],
        AuditEvent::Reload {
            trigger,
            path,
            result,
            revoked,
            updated,
            errors,
        } => vec![
            ("trigger", json!(trigger)),
            ("path", json!(path.map(|p| p.display().to_string()))),
            ("result", json!(result)),
            ("sessions_revoked", json!(revoked)),
            ("sessions_updated", json!(updated)),
            ("errors", json!(errors)),
        ],
    }
}

/// One line of the audit stream (without the newline): `{"time":...,"event":...,...}`.
pub fn json_line(time: SystemTime, e: &AuditEvent<'_>) -> String {
    let mut out = String::with_capacity(256);
    out.push('{');
    let head = [
        ("time", json!(rfc3339_millis(time))),
        ("event", json!(event_name(e))),
    ];
    for (i, (k, v)) in head.into_iter().chain(fields(e)).enumerate() {
        if i > 0 {
            out.push(',');
        }
        // Keys are plain identifiers; values are serialized (and escaped) by serde_json.
        out.push('"');
        out.push_str(k);
        out.push_str("\":");
        out.push_str(&v.to_string());
    }
    out.push('}');
    out
}

/// The record as a `tracing` event.
fn trace(e: &AuditEvent<'_>) {
    match e {
        AuditEvent::Login {
            src,
            identity,
            service,
            action,
            rule,
            expires_at,
        } => tracing::info!(
            target: "idgate::audit",
            event = "login",
            src = %src,
            srcuser = %identity.user,
            subject = %identity.subject,
            issuer = %identity.issuer,
            groups = ?identity.groups,
            identity_id = identity.id,
            app = %service.name,
            proto = %service.protocol,
            dport = service.port,
            action,
            rule = rule.map_or("(default)", |r| r.0),
            rule_id = rule.map_or(0, |r| r.1),
            expires = expires_at.map(rfc3339),
            "login {action}"
        ),
        AuditEvent::LoginFailed {
            src,
            peer,
            reason,
            status,
        } => tracing::info!(
            target: "idgate::audit",
            event = "login-failed",
            src = %src,
            peer = peer.map(|p| p.to_string()),
            reason,
            status,
            "login refused: {reason}"
        ),
        AuditEvent::Replaced { src, old, new } => tracing::info!(
            target: "idgate::audit",
            event = "identity-replaced",
            src = %src,
            srcuser = %new.user,
            issuer = %new.issuer,
            previous_user = %old.user,
            previous_issuer = %old.issuer,
            "{} replaces {} at {src}",
            new.user,
            old.user
        ),
        AuditEvent::SessionEnd {
            src,
            identity,
            service,
            rule,
            reason,
        } => tracing::info!(
            target: "idgate::audit",
            event = "session-end",
            src = %src,
            srcuser = %identity.user,
            issuer = %identity.issuer,
            identity_id = identity.id,
            app = %service.name,
            proto = %service.protocol,
            dport = service.port,
            rule = rule.0,
            rule_id = rule.1,
            session_end_reason = reason,
            "session end reason: {reason}"
        ),
        AuditEvent::Flow {
            action,
            reason,
            reset,
            src,
            dst,
            proto,
            app,
            srcuser,
            rule,
        } => tracing::info!(
            target: "idgate::audit",
            event = "flow",
            action,
            reason,
            reset,
            src = %src.ip(),
            sport = src.port(),
            dst = %dst.ip(),
            dport = dst.port(),
            proto,
            app,
            srcuser,
            rule,
            "flow {action}: {reason}"
        ),
        AuditEvent::FlowsSuppressed { count } => tracing::info!(
            target: "idgate::audit",
            event = "flows-suppressed",
            count,
            "{count} flow records suppressed"
        ),
        AuditEvent::Reload {
            trigger,
            path,
            result,
            revoked,
            updated,
            errors,
        } => tracing::info!(
            target: "idgate::audit",
            event = "config-reload",
            trigger,
            path = path.map(|p| p.display().to_string()),
            result,
            sessions_revoked = revoked,
            sessions_updated = updated,
            errors = ?errors,
            "configuration reload ({trigger}) {result}"
        ),
    }
}

/// Bounds flow records: at most `per_window` in each window (the caller rolls it, e.g. every
/// second), the rest only counted and reported as [`AuditEvent::FlowsSuppressed`].
#[derive(Debug)]
pub struct FlowBudget {
    per_window: u64,
    used: u64,
    suppressed: u64,
}

impl FlowBudget {
    /// A budget of `per_window` records per window.
    pub fn new(per_window: u64) -> Self {
        Self {
            per_window,
            used: 0,
            suppressed: 0,
        }
    }

    /// Whether one more record may be written in this window (if not, it is counted).
    pub fn admit(&mut self) -> bool {
        if self.used < self.per_window {
            self.used += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    /// Starts a new window; returns how many records the old one suppressed.
    pub fn roll(&mut self) -> u64 {
        self.used = 0;
        std::mem::take(&mut self.suppressed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::{Protocol, ServiceId};

    fn alice() -> IdentityRecord {
        IdentityRecord {
            id: 3,
            issuer: "https://idp.example".into(),
            subject: "sub-1".into(),
            user: "ali\"ce".into(),
            groups: vec!["web".into(), "ops".into()],
        }
    }

    fn api() -> ServiceInfo {
        ServiceInfo {
            id: ServiceId::new(1).unwrap(),
            name: "api".into(),
            protocol: Protocol::Tcp,
            port: 8000,
        }
    }

    /// The line as JSON, after checking it is one line and that `time` and `event` lead.
    fn parse(line: &str) -> serde_json::Map<String, Value> {
        assert!(!line.contains('\n'), "{line}");
        assert!(line.starts_with("{\"time\":\""), "{line}");
        let v: Value = serde_json::from_str(line).unwrap();
        let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        assert!(keys.contains(&"event".to_owned()));
        v.as_object().unwrap().clone()
    }

    #[test]
    fn login_lines_carry_every_field_under_palo_alto_names() {
        let when = UNIX_EPOCH + Duration::from_millis(1_700_000_000_042);
        let (who, svc) = (alice(), api());
        let line = json_line(
            when,
            &AuditEvent::Login {
                src: "192.0.2.7".parse().unwrap(),
                identity: &who,
                service: &svc,
                action: "allow",
                rule: Some(("web-users", 2)),
                expires_at: Some(UNIX_EPOCH + Duration::from_secs(1_700_000_600)),
            },
        );
        let m = parse(&line);
        assert_eq!(
            Value::Object(m),
            json!({
                "time": "2023-11-14T22:13:20.042Z",
                "event": "login",
                "src": "192.0.2.7",
                "srcuser": "ali\"ce",
                "subject": "sub-1",
                "issuer": "https://idp.example",
                "groups": ["web", "ops"],
                "identity_id": 3,
                "app": "api",
                "proto": "tcp",
                "dport": 8000,
                "action": "allow",
                "rule": "web-users",
                "rule_id": 2,
                "expires": "2023-11-14T22:23:20Z",
            })
        );
    }

    #[test]
    fn every_event_is_one_json_line_with_time_and_event() {
        let (who, svc) = (alice(), api());
        let src: IpAddr = "2001:db8::1".parse().unwrap();
        let events = [
            AuditEvent::LoginFailed {
                src,
                peer: None,
                reason: "invalid_signature",
                status: 401,
            },
            AuditEvent::Replaced {
                src,
                old: &who,
                new: &who,
            },
            AuditEvent::SessionEnd {
                src,
                identity: &who,
                service: &svc,
                rule: ("web-users", 2),
                reason: "logout",
            },
            AuditEvent::Flow {
                action: "deny",
                reason: "no-session",
                reset: true,
                src: "[2001:db8::1]:40000".parse().unwrap(),
                dst: "[2001:db8::2]:8000".parse().unwrap(),
                proto: "tcp",
                app: Some("api"),
                srcuser: None,
                rule: None,
            },
            AuditEvent::FlowsSuppressed { count: 12 },
        ];
        let names = [
            "login-failed",
            "identity-replaced",
            "session-end",
            "flow",
            "flows-suppressed",
        ];
        for (e, name) in events.iter().zip(names) {
            let m = parse(&json_line(SystemTime::now(), e));
            assert_eq!(m["event"], name);
        }
        let m = parse(&json_line(SystemTime::now(), &events[0]));
        assert_eq!(m["peer"], Value::Null);
        assert_eq!(m["status"], 401);
        let m = parse(&json_line(SystemTime::now(), &events[2]));
        assert_eq!(m["session_end_reason"], "logout");
        assert_eq!(m["srcuser"], "ali\"ce");
        let m = parse(&json_line(SystemTime::now(), &events[3]));
        assert_eq!(
            (&m["src"], &m["sport"], &m["dport"]),
            (&json!("2001:db8::1"), &json!(40000), &json!(8000))
        );
        assert_eq!(m["srcuser"], Value::Null);
        let m = parse(&json_line(SystemTime::now(), &events[4]));
        assert_eq!(m["count"], 12);
    }

    #[test]
    fn the_file_sink_appends_lines_with_mode_0640_and_counts_suppressed_flows() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("idgate-audit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.jsonl");
        let _ = std::fs::remove_file(&path);
        let log = AuditLog::open(&AuditConfig::File(path.clone())).unwrap();
        log.record(&AuditEvent::FlowsSuppressed { count: 5 });
        log.record(&AuditEvent::FlowsSuppressed { count: 2 });
        assert_eq!(log.flows_suppressed(), 7);
        assert_eq!(log.write_errors(), 0);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<_> = text.lines().map(parse).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["count"], 5);
        assert_eq!(lines[1]["event"], "flows-suppressed");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640 & !umask_bits(), "{mode:o}");
        // A second log appends.
        AuditLog::open(&AuditConfig::File(path.clone()))
            .unwrap()
            .record(&AuditEvent::FlowsSuppressed { count: 1 });
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 3);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The bits the process umask clears (creation modes are masked by it).
    fn umask_bits() -> u32 {
        // Without unsafe code: read it from /proc.
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Umask:"))
                    .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            })
            .unwrap_or(0o022)
    }

    #[test]
    fn journal_datagrams_use_the_native_field_format() {
        let d = journal_datagram("a\nb", "login", "{\"x\":1}");
        let mut expected = b"MESSAGE\n".to_vec();
        expected.extend_from_slice(&3u64.to_le_bytes());
        expected.extend_from_slice(b"a\nb\n");
        expected.extend_from_slice(
            b"PRIORITY=6\nSYSLOG_IDENTIFIER=idgate\nIDGATE_EVENT=login\nIDGATE_AUDIT={\"x\":1}\n",
        );
        assert_eq!(d, expected);
    }

    #[test]
    fn flow_budget_caps_each_window_and_counts_the_rest() {
        let mut b = FlowBudget::new(3);
        let admitted = (0..10).filter(|_| b.admit()).count();
        assert_eq!(admitted, 3);
        assert_eq!(b.roll(), 7);
        assert!(b.admit());
        assert_eq!(b.roll(), 0);
    }
}
