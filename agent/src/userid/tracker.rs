//! Turns audit events into User-ID updates.
//!
//! The firewall maps an address to one user, while idgate's sessions are per (address,
//! service): the tracker keeps, per address, the user and the expiry of each of its sessions,
//! and speaks to the firewall per address: `login` with the time left until the last of its
//! sessions ends, `logout` when the last one ends. With tags enabled, a user's tags are
//! registered while any of its addresses is mapped, and unregistered after the last.

use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, SystemTime},
};

use super::xml::Op;
use crate::{config::TagConfig, session::audit::AuditEvent};

/// The longest login timeout sent (minutes): 30 days, the longest session idgate allows.
pub const MAX_LOGIN_TIMEOUT_MIN: u32 = 30 * 24 * 60;
/// The longest tag name PAN-OS accepts.
pub const MAX_TAG_LEN: usize = 127;
/// The longest tag timeout PAN-OS accepts (seconds): 30 days.
pub const MAX_TAG_TIMEOUT_S: u64 = 30 * 24 * 3600;

/// What a session change means for the firewall, owned (the audit event borrows).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A session for `service` at `ip` allowed until `expires_at` (login or refresh).
    Granted {
        /// The client.
        ip: IpAddr,
        /// Who.
        user: String,
        /// Their groups.
        groups: Vec<String>,
        /// The service's id.
        service: u32,
        /// When the session ends.
        expires_at: SystemTime,
    },
    /// The session for `service` at `ip` ended.
    Ended {
        /// The client.
        ip: IpAddr,
        /// Whose it was.
        user: String,
        /// The service's id.
        service: u32,
    },
}

impl Event {
    /// The event an audit record means, if any (only allowed logins with a session, and
    /// session ends).
    pub fn from_audit(e: &AuditEvent<'_>) -> Option<Event> {
        match e {
            AuditEvent::Login {
                src,
                identity,
                service,
                action: "allow",
                expires_at: Some(expires_at),
                ..
            } => Some(Event::Granted {
                ip: src.to_canonical(),
                user: identity.user.clone(),
                groups: identity.groups.clone(),
                service: service.id.get(),
                expires_at: *expires_at,
            }),
            AuditEvent::SessionEnd {
                src,
                identity,
                service,
                ..
            } => Some(Event::Ended {
                ip: src.to_canonical(),
                user: identity.user.clone(),
                service: service.id.get(),
            }),
            _ => None,
        }
    }
}

#[derive(Debug)]
struct Source {
    user: String,
    sessions: HashMap<u32, SystemTime>,
}

#[derive(Debug)]
struct UserState {
    addresses: usize,
    tags: Vec<String>,
}

/// Per-address state, and the updates each event calls for.
#[derive(Debug)]
pub struct Tracker {
    sources: HashMap<IpAddr, Source>,
    users: HashMap<String, UserState>,
    tags: Option<TagConfig>,
}

/// Whole minutes covering `left`, at least 1 (0 would mean "never expires"), at most
/// [`MAX_LOGIN_TIMEOUT_MIN`].
pub fn timeout_minutes(left: Duration) -> u32 {
    let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
    u32::try_from(secs.div_ceil(60))
        .unwrap_or(u32::MAX)
        .clamp(1, MAX_LOGIN_TIMEOUT_MIN)
}

/// Whole seconds covering `left`, at least 1, at most [`MAX_TAG_TIMEOUT_S`].
pub fn timeout_seconds(left: Duration) -> u64 {
    (left.as_secs() + u64::from(left.subsec_nanos() > 0)).clamp(1, MAX_TAG_TIMEOUT_S)
}

/// The tags for these groups: prefixed, de-duplicated, those too long for PAN-OS left out.
pub fn tags_for(groups: &[String], config: &TagConfig) -> Vec<String> {
    let mut out: Vec<String> = groups
        .iter()
        .map(|g| format!("{}{g}", config.prefix))
        .filter(|t| !t.is_empty() && t.chars().count() <= MAX_TAG_LEN)
        .collect();
    out.sort();
    out.dedup();
    out
}

impl Tracker {
    /// A tracker; with `tags`, users' groups are registered as tags.
    pub fn new(tags: Option<TagConfig>) -> Self {
        Self {
            sources: HashMap::new(),
            users: HashMap::new(),
            tags,
        }
    }

    /// Addresses currently mapped.
    pub fn addresses(&self) -> usize {
        self.sources.len()
    }

    /// Applies `event` as of `now`; returns the updates it calls for.
    pub fn apply(&mut self, event: Event, now: SystemTime) -> Vec<Op> {
        let mut out = Vec::new();
        match event {
            Event::Granted {
                ip,
                user,
                groups,
                service,
                expires_at,
            } => {
                if self.sources.get(&ip).is_some_and(|s| s.user != user) {
                    // Another user took the address over: the login below replaces the
                    // mapping; only the old user's tags may need to go.
                    if let Some(old) = self.sources.remove(&ip) {
                        self.forget_address(&old.user, &mut out);
                    }
                }
                let source = self.sources.entry(ip).or_insert_with(|| Source {
                    user: user.clone(),
                    sessions: HashMap::new(),
                });
                let new_address = source.sessions.is_empty();
                source.sessions.insert(service, expires_at);
                let until = source
                    .sessions
                    .values()
                    .max()
                    .copied()
                    .unwrap_or(expires_at);
                let left = until.duration_since(now).unwrap_or_default();
                out.push(Op::Login {
                    user: user.clone(),
                    ip,
                    timeout_min: timeout_minutes(left),
                });
                if let Some(config) = &self.tags {
                    let tags = tags_for(&groups, config);
                    let state = self.users.entry(user.clone()).or_insert(UserState {
                        addresses: 0,
                        tags: Vec::new(),
                    });
                    if new_address {
                        state.addresses += 1;
                    }
                    // Tags dropped from the groups are left to their timeout: an unregister
                    // here would be replaced by the register below while both wait.
                    state.tags = tags.clone();
                    if !tags.is_empty() {
                        out.push(Op::Tag {
                            user,
                            tags,
                            timeout_s: timeout_seconds(left),
                        });
                    }
                }
            }
            Event::Ended { ip, user, service } => {
                let Some(source) = self.sources.get_mut(&ip) else {
                    return out;
                };
                if source.user != user {
                    return out;
                }
                source.sessions.remove(&service);
                if source.sessions.is_empty() {
                    self.sources.remove(&ip);
                    out.push(Op::Logout {
                        user: user.clone(),
                        ip,
                    });
                    self.forget_address(&user, &mut out);
                }
            }
        }
        out
    }

    /// One address of `user` is no longer mapped: after the last, its tags go.
    fn forget_address(&mut self, user: &str, out: &mut Vec<Op>) {
        let Some(state) = self.users.get_mut(user) else {
            return;
        };
        state.addresses = state.addresses.saturating_sub(1);
        if state.addresses == 0
            && let Some(state) = self.users.remove(user)
            && !state.tags.is_empty()
        {
            out.push(Op::Untag {
                user: user.to_owned(),
                tags: state.tags,
            });
        }
    }
}
