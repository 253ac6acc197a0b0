//! The audit trail: who got (or lost) access to what, and why.
//!
//! Every audit record goes through [`record`], which writes it as a structured `tracing` event
//! with target `idgate::audit`. Field names follow Palo Alto's traffic and User-ID logs where one
//! fits (`src`, `srcuser`, `dst`, `dport`, `proto`, `app`, `rule`, `action`,
//! `session_end_reason`). A dedicated JSON-lines stream can replace this one function later.

use std::{net::IpAddr, net::SocketAddr, time::SystemTime};

use super::{IdentityRecord, ServiceInfo, time::rfc3339};

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
}

/// Writes one audit record.
pub fn record(e: &AuditEvent<'_>) {
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
